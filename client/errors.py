"""Typed errors of the svdq client, one per status code, carrying the server's message.

Each class also derives from the matching :mod:`svdq.errors` class, so code written for
the in-process library (``except svdq.InvalidInputError``) handles remote errors too.
"""

from __future__ import annotations

import grpc

from svdq import errors as library


class ServiceError(library.SvdqError):
    """A failed call. ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidInputError(ServiceError, library.InvalidInputError):
    """INVALID_ARGUMENT: a field is malformed; the message names it and what is allowed."""


class NotFoundError(ServiceError, library.NotFoundError):
    """NOT_FOUND: unknown profile or sequence (another tenant's sequence looks the same)."""

    def __str__(self) -> str:
        return ServiceError.__str__(self)


class ConflictError(ServiceError, library.ConflictError):
    """FAILED_PRECONDITION or ALREADY_EXISTS: the request conflicts with stored state
    (out-of-order append, existing sequence, incomplete upload)."""


class ResourceExhaustedError(ServiceError, library.ResourceExhaustedError):
    """RESOURCE_EXHAUSTED: store budget, message size or token limit exceeded."""


class UnavailableError(ServiceError, library.UnavailableError):
    """UNAVAILABLE after the client's retries: server down, starting or stopping."""


class AuthenticationError(ServiceError):
    """UNAUTHENTICATED: missing or unknown bearer token."""


class PermissionDeniedError(ServiceError):
    """PERMISSION_DENIED."""


class DeadlineExceededError(ServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_from_rpc(error: grpc.RpcError) -> ServiceError:
    """The typed exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _BY_CODE.get(code, ServiceError)(details or "", code)


__all__ = [
    "AuthenticationError",
    "ConflictError",
    "DeadlineExceededError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServiceError",
    "UnavailableError",
    "error_from_rpc",
]
