"""The gate in front of every handler of a cdimf server: request bytes decoded, the call proof checked against them, stream aborts drained.

Jobs that need the request as the bytes that travelled, which gRPC's own deserialisation
hides from a handler:

- Decoding: each method is registered without a request deserializer and the gate decodes the
  bytes itself, so a request that is no valid message gets INVALID_ARGUMENT and one WARNING
  line (gRPC would answer UNKNOWN and log a traceback at ERROR).
- The call proof (cdimf.common.security.call_proof), under TLS: it binds SHA-256 of the
  serialized request, or of a request stream's first message, so the gate verifies it once that
  message arrived and before the handler runs.
- Size: a method can have a bound on its request's bytes, checked before decoding.
- Refusing a request stream: a server that answers before the client half-closed makes
  grpcio's asyncio client report `INTERNAL: Internal error from Core` instead of the answer when
  one of its later writes loses the race with the status (grpc/grpc#36066). Every abort of a
  request-streaming call therefore first reads the rest of the stream and discards it (bounded by
  DRAIN_LIMIT_BYTES and DRAIN_LIMIT_S), so the client's writes finish before the status is sent.
"""

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from cdimf.common.security.call_proof import CallAuthenticator, CallRefused, request_digest

log = logging.getLogger("cdimf.rpc")

# How much of a refused request stream is read and dropped before the refusal is sent: enough for
# the largest push of a node (a 1 GiB matrix), and never longer than the time a client gets anyway.
DRAIN_LIMIT_BYTES = 1 << 30
DRAIN_LIMIT_S = 30.0
Deserializer = Callable[[bytes], Any] | None


def _message_name(deserializer: Deserializer) -> str:
    """The protobuf type a deserializer reads (`cdimf.v1.StatusRequest`), for log lines."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


async def _decoded(deserializer: Deserializer, raw: bytes, method: str, context: grpc.aio.ServicerContext,
                   refuse: Callable[[grpc.StatusCode, str], Awaitable[None]]) -> Any:
    """`raw` decoded by `deserializer` (bytes when it is None); an undecodable request is refused
    with INVALID_ARGUMENT after one WARNING line."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception as error:  # protobuf's DecodeError, or anything a custom deserializer raises
        name = _message_name(deserializer)
        log.warning("refused a call of %s from %s: %d request bytes are not a valid %s (%s)", method, context.peer(), len(raw), name,
                    str(error)[:120])
        await refuse(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name} message")
        raise AssertionError("unreachable") from None


class _RequestStream:
    """A call's request stream as raw bytes: its first message, the decoded messages, and draining."""

    def __init__(self, raw: AsyncIterator[bytes], deserializer: Deserializer, method: str, context: grpc.aio.ServicerContext) -> None:
        """Read `raw` (gRPC's receiver of a method registered without deserializer)."""
        self._raw = aiter(raw)
        self._deserializer = deserializer
        self._method = method
        self._context = context
        self._first: bytes | None = None
        self._ended = False

    async def first(self) -> bytes | None:
        """The first message's bytes, None for an empty stream (read once, kept for `messages`)."""
        self._first = await self._next()
        return self._first

    async def _next(self) -> bytes | None:
        """The next raw message, None at the end."""
        if self._ended:
            return None
        message = await anext(self._raw, None)
        self._ended = message is None
        return message

    async def drain(self) -> None:
        """Read and drop what the client still sends (bounded), so its writes end before our status."""
        read, give_up = 0, time.monotonic() + DRAIN_LIMIT_S
        try:
            while read <= DRAIN_LIMIT_BYTES:
                left = give_up - time.monotonic()
                if left <= 0:
                    return
                message = await asyncio.wait_for(self._next(), left)
                if message is None:
                    return
                read += len(message)
        except Exception:  # best effort: the client went away, stalls or the call already ended; answer now
            return

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        """Drain the stream, then end the call with `code` and `details`."""
        await self.drain()
        await self._context.abort(code, details, trailing_metadata)

    async def messages(self) -> AsyncIterator[Any]:
        """The decoded messages: the first one again, then the rest."""
        message = self._first
        while message is not None:
            yield await _decoded(self._deserializer, message, self._method, self._context, self.abort)
            message = await self._next()


class _StreamContext:
    """The servicer context a request-streaming handler gets: aborts drain the request stream first."""

    def __init__(self, context: grpc.aio.ServicerContext, stream: _RequestStream) -> None:
        """Wrap `context` of the call whose requests `stream` reads."""
        self._context = context
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        """Everything else is the call's own context."""
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        """Read the rest of the request stream, then abort as the context does."""
        await self._stream.abort(code, details, trailing_metadata)


async def _answer(behavior: Callable[..., Any], request: Any, context: Any) -> Any:
    """The response of a unary-response handler, a coroutine function or a plain one."""
    result = behavior(request, context)
    return await result if inspect.isawaitable(result) else result


async def _respond(behavior: Callable[..., Any], request: Any, context: Any) -> AsyncIterator[Any]:
    """The responses of a response-streaming handler, an async generator or a coroutine that writes."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    elif inspect.isawaitable(result):
        await result
    else:  # a synchronous generator
        for response in result:
            yield response


class RequestGate(grpc.aio.ServerInterceptor):
    """Decodes every request itself and, with an authenticator (TLS), verifies each call's proof before the handler runs."""

    def __init__(self, authenticator: CallAuthenticator | None, request_limits: Mapping[str, int] | None = None) -> None:
        """`authenticator`: the per-call proof check of a TLS server; None on a plaintext one.
        `request_limits`: the most bytes a unary request of a method (full path) may have."""
        self._authenticator = authenticator
        self._limits = dict(request_limits or {})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler behind the gate (None for an unknown method: gRPC answers UNIMPLEMENTED)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._gated(handler, handler_call_details.method)

    async def _check(self, context: grpc.aio.ServicerContext, method: str, first: bytes | None,
                     refuse: Callable[[grpc.StatusCode, str], Awaitable[None]]) -> None:
        """Refuse the call (UNAUTHENTICATED) unless its proof verifies for `first`, its request bytes."""
        if self._authenticator is None:
            return
        try:
            self._authenticator.authenticate(context.invocation_metadata(), method, request_digest(first or b""))
        except CallRefused as refusal:
            await refuse(refusal.code, refusal.detail)

    def _gated(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` registered without request deserializer, with the gate in front of its behaviour."""
        deserializer: Deserializer = handler.request_deserializer
        check = self._check
        limit = self._limits.get(method)

        if not handler.request_streaming:
            async def unary_request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                if limit is not None and len(raw) > limit:
                    # refused before it is decoded: protobuf would fold repeated map entries into a small message
                    log.warning("refused a call of %s from %s: %d request bytes, at most %d", method, context.peer(), len(raw), limit)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"the {method.rsplit('/', 1)[-1]} request is {len(raw)} bytes, at most {limit}")
                await check(context, method, raw, context.abort)
                return await _decoded(deserializer, raw, method, context, context.abort)

            if not handler.response_streaming:
                async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                    request = await unary_request(raw, context)
                    return await _answer(handler.unary_unary, request, context)

                return handler._replace(request_deserializer=None, unary_unary=unary_unary)

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request = await unary_request(raw, context)
                async for response in _respond(handler.unary_stream, request, context):
                    yield response

            return handler._replace(request_deserializer=None, unary_stream=unary_stream)

        async def opened(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> tuple[AsyncIterator[Any], _StreamContext]:
            stream = _RequestStream(raw, deserializer, method, context)
            await check(context, method, await stream.first(), stream.abort)
            return stream.messages(), _StreamContext(context, stream)

        if not handler.response_streaming:
            async def stream_unary(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                messages, gated = await opened(raw, context)
                return await _answer(handler.stream_unary, messages, gated)

            return handler._replace(request_deserializer=None, stream_unary=stream_unary)

        async def stream_stream(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            messages, gated = await opened(raw, context)
            async for response in _respond(handler.stream_stream, messages, gated):
                yield response

        return handler._replace(request_deserializer=None, stream_stream=stream_stream)
