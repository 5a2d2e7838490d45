"""Shared test helper: a client-side recorder of every request message a gRPC channel sends."""

import grpc

from cdimf.protos.v1 import federation_pb2 as pb

# requests a client sends as wire bytes it serialised itself (AggregatorClient's factor push)
_SENT_AS_BYTES = {"/cdimf.v1.Aggregator/PushContribution": pb.MatrixChunk}


class WireRecorder:
    """Records every request message a client sends (shared by the per-kind interceptors)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def record(self, details: grpc.aio.ClientCallDetails, message: object) -> None:
        """Keep one request message with its full method name."""
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if isinstance(message, bytes):
            # the bytes are what crosses the wire: parse them strictly, so the checks see every field
            message = _SENT_AS_BYTES[method].FromString(message)
        self.sent.append((method, message))

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """One interceptor per call kind (a channel files each interceptor under one kind only)."""
        recorder = self

        class Unary(grpc.aio.UnaryUnaryClientInterceptor):
            """Records unary requests."""

            async def intercept_unary_unary(self, continuation, client_call_details, request):
                """Record the request, then send it."""
                recorder.record(client_call_details, request)
                return await continuation(client_call_details, request)

        class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
            """Records the request of server-streaming calls."""

            async def intercept_unary_stream(self, continuation, client_call_details, request):
                """Record the request, then send it."""
                recorder.record(client_call_details, request)
                return await continuation(client_call_details, request)

        class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
            """Records every message of client-streaming calls as it is sent."""

            async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
                """Wrap the request stream so that each message is recorded on its way out."""

                def recorded():
                    for message in request_iterator:
                        recorder.record(client_call_details, message)
                        yield message

                return await continuation(client_call_details, recorded())

        return [Unary(), UnaryStream(), StreamUnary()]
