"""Compatibility: the domain types live in :mod:`svdq.api.types`, shared with the server."""

from svdq.api.types import *  # noqa: F403
from svdq.api.types import __all__  # noqa: F401
