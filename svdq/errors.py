"""Typed errors of the svdq library.

Every error names what was wrong and what is allowed, so that the service can pass the
message to a remote caller unchanged. The gRPC layer maps each class to one status code.
"""

from __future__ import annotations


class SvdqError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidInputError(SvdqError, ValueError):
    """A tensor, option or request field is malformed (maps to INVALID_ARGUMENT)."""


class FormatError(SvdqError, ValueError):
    """A serialized blob is truncated, corrupted or of an unsupported version."""


class NotFoundError(SvdqError, KeyError):
    """A named sequence, layer or profile does not exist (maps to NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ResourceExhaustedError(SvdqError):
    """A byte or size budget would be exceeded (maps to RESOURCE_EXHAUSTED)."""


class ConflictError(SvdqError):
    """A request conflicts with stored state, e.g. an out-of-order append
    (maps to FAILED_PRECONDITION)."""


class UnavailableError(SvdqError):
    """The engine is not ready or is shutting down (maps to UNAVAILABLE)."""
