"""The one server interceptor: authentication, domain error -> status code, RPC metrics.

Every ``svdq.v1.KVCache`` call passes through :class:`ServiceInterceptor`, which

* resolves the caller's tenant from its bearer token (UNAUTHENTICATED otherwise) and makes
  it available to the servicer through :data:`current_tenant`;
* maps the library's typed errors to status codes with their message unchanged (the
  messages name the field and what is allowed); anything unexpected becomes INTERNAL with
  a short reference, the traceback going to the log only;
* answers INVALID_ARGUMENT to request bytes that do not parse as the method's message
  (grpc would answer UNKNOWN, or INTERNAL inside a stream, and log a traceback each time),
  with one rate-limited WARNING line for all of them;
* records ``svdq_rpc_duration_seconds`` and ``svdq_rpc_total{method,code}``.

Health and reflection calls are left alone (probes carry no token).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid

import grpc
from svdq_proto.svdq.v1 import kvcache_pb2

from svdq.api.types import abbreviate
from svdq.errors import (
    ConflictError,
    FormatError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

from .auth import AuthenticationError, TokenAuthenticator

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/svdq.v1.KVCache/"

#: the authenticated tenant of the call being served
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("svdq_tenant")

_METHODS = kvcache_pb2.DESCRIPTOR.services_by_name["KVCache"].methods_by_name
#: at most one WARNING line per this many seconds about unparsable requests
MALFORMED_LOG_INTERVAL_SECONDS = 10.0

# Subclasses first: the first matching class decides.
_STATUS = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (FormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


class MalformedRequestError(InvalidInputError):
    """The request bytes are not a valid protobuf message of the method's request type."""


class _Unparsable:
    """Stands in for a request whose bytes did not parse: grpc calls the deserializer
    outside any handler code, so raising there could not be mapped to a status."""

    __slots__ = ("error",)

    def __init__(self, error: MalformedRequestError) -> None:
        self.error = error


def _tolerant(deserializer, message_type: str):
    """``deserializer`` that returns an :class:`_Unparsable` instead of raising."""

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - whatever parsing raises, the bytes were not a message
            return _Unparsable(MalformedRequestError(
                f"the request could not be parsed as a {message_type} message ({type(exc).__name__}: "
                f"{abbreviate(str(exc), 120)}); send a serialized {message_type}"))

    return deserialize


def _parsed(request):
    """``request`` itself, or the MalformedRequestError it stands for."""
    if isinstance(request, _Unparsable):
        raise request.error
    return request


async def _parsed_stream(requests):
    async for request in requests:
        yield _parsed(request)


class RateLimitedLog:
    """At most one log line per ``interval`` seconds; the next line says how many were left out.

    A client sending garbage in a loop must not flood the log (and the disk) with one
    line per request, while an operator still sees that it happens and how often.
    """

    def __init__(self, logger: logging.Logger, level: int, interval: float,
                 clock=time.monotonic) -> None:
        self.logger, self.level, self.interval, self._clock = logger, level, interval, clock
        self._next = 0.0
        self.suppressed = 0

    def log(self, message: str, *args) -> bool:
        """Log ``message % args`` unless a line went out less than ``interval`` ago; returns
        whether it was logged."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" (and {self.suppressed} more like it since the last such line)"
            self.suppressed = 0
        self._next = now + self.interval
        self.logger.log(self.level, message, *args)
        return True


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of a library error (INTERNAL for anything else)."""
    if isinstance(error, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    for error_type, code in _STATUS:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Auth, error mapping and metrics for the svdq service (see the module docstring).

    Args:
        authenticator: maps tokens to tenants.
        metrics: a :class:`svdq_server.metrics.Metrics` or None.
    """

    def __init__(self, authenticator: TokenAuthenticator, metrics=None) -> None:
        self.authenticator = authenticator
        self.metrics = metrics
        self.malformed_log = RateLimitedLog(log, logging.WARNING, MALFORMED_LOG_INTERVAL_SECONDS)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        method = handler_call_details.method[len(SERVICE_PREFIX):]
        metadata = dict(handler_call_details.invocation_metadata or ())
        authorization = metadata.get("authorization")
        described = _METHODS.get(method)
        deserializer = handler.request_deserializer
        if deserializer is not None and described is not None:
            deserializer = _tolerant(deserializer, described.input_type.full_name)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, authorization, stream=False),
                request_deserializer=deserializer, response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, authorization, stream=True),
                request_deserializer=deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, authorization),
                request_deserializer=deserializer, response_serializer=handler.response_serializer)
        return handler  # no bidirectional methods in svdq.v1

    def _unary(self, behaviour, method: str, authorization: str | None, stream: bool):
        async def wrapped(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                current_tenant.set(self.authenticator.tenant_for(authorization))
                return await behaviour(_parsed_stream(request) if stream else _parsed(request), context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:  # noqa: BLE001 - every failure is mapped, never leaked
                code = _code_of(error, context)
                await self._abort(error, code, context, method)
            finally:
                self._record(method, code, started)

        return wrapped

    def _streaming(self, behaviour, method: str, authorization: str | None):
        async def wrapped(request, context):
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                current_tenant.set(self.authenticator.tenant_for(authorization))
                async for response in behaviour(_parsed(request), context):
                    yield response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:  # noqa: BLE001 - every failure is mapped, never leaked
                code = _code_of(error, context)
                await self._abort(error, code, context, method)
            finally:
                self._record(method, code, started)

        return wrapped

    async def _abort(self, error: Exception, code: grpc.StatusCode, context: grpc.aio.ServicerContext,
                     method: str) -> None:
        """Abort the call with ``code`` and a message a caller can act on (always raises)."""
        if isinstance(error, grpc.aio.AbortError):
            raise error  # the servicer aborted with its own status already
        if code == grpc.StatusCode.INTERNAL:
            reference = uuid.uuid4().hex[:12]
            log.error("internal error in %s (reference %s)", method, reference, exc_info=error)
            message = f"internal error (reference {reference}; details are in the server log)"
        elif isinstance(error, MalformedRequestError):
            message = str(error)
            self.malformed_log.log("%s: unparsable request from %s: %s", method, context.peer(), message)
        else:
            message = str(error)
            log.info("%s failed with %s: %s", method, code.name, message)
        await context.abort(code, message)

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self.metrics is not None:
            self.metrics.rpc_finished(method, code.name, time.perf_counter() - started)


def _code_of(error: Exception, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return status_for(error)
