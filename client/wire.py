"""Compatibility: the tensor wire format lives in :mod:`svdq.api.wire`, shared with the server."""

from svdq.api.wire import *  # noqa: F403
from svdq.api.wire import __all__  # noqa: F401
