"""The zero-copy path of the factor streams, both sides: PushContribution and PullConsensus as MatrixChunk wire bytes.

The bytes on the wire are those of the generated code's MatrixChunk messages, but neither side
lets protobuf parse or build the chunks of the two big streams: each megabyte payload is copied
once (from the rows into the message, or from the message into the matrix) instead of three
times (parse, `.data` read; `tobytes`, encoder, output). The server registers the two methods
without a request deserializer (push) and without a response serializer (pull); the client calls
them without a request serializer (push) and without a response deserializer (pull). The chunk
codec itself (split_matrix_chunk, encode_matrix_serialized, MatrixAssembler.add_serialized) is
cdimf.common.wire.chunks.
"""

from collections.abc import Iterator

import grpc
import numpy as np

from cdimf.common.wire.chunks import MatrixAssembler, encode_matrix_serialized
from cdimf.protos.v1 import federation_pb2 as pb
from cdimf.protos.v1 import federation_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
PUSH_METHOD = f"/{SERVICE}/PushContribution"
PULL_METHOD = f"/{SERVICE}/PullConsensus"


# ----- server side -----


class _HandlerCapture:
    """Stands in for a server to receive the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: the same handlers also come through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Keep the handlers by method name."""
        self.handlers.update(handlers)


def add_aggregator_to_server(servicer: pb_grpc.AggregatorServicer, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated code does, but with the factor streams as wire bytes.

    Its PushContribution receives each MatrixChunk unparsed (bytes) and its PullConsensus yields
    each one already serialised (bytes).
    """
    capture = _HandlerCapture()
    pb_grpc.add_AggregatorServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    handlers["PushContribution"] = handlers["PushContribution"]._replace(request_deserializer=None)
    handlers["PullConsensus"] = handlers["PullConsensus"]._replace(response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


# ----- client side -----


class MatrixExchange:
    """The client side on one channel: push a matrix, pull one, both as MatrixChunk wire bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """Bind the two methods on `channel` without protobuf (de)serialisation of the chunks."""
        self._push = channel.stream_unary(PUSH_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString)
        self._pull = channel.unary_stream(PULL_METHOD, request_serializer=pb.PullRequest.SerializeToString, response_deserializer=None)

    async def push(self, values: np.ndarray, header: pb.Header, dtype: str, timeout: float) -> pb.Ack:
        """One PushContribution stream of `values` (rows in membership order) under `header`."""
        chunks: Iterator[bytes] = encode_matrix_serialized(values, header, dtype=dtype)
        return await self._push(chunks, timeout=timeout)

    async def pull(self, request: pb.PullRequest, what: str, expected_rows: int, timeout: float
                   ) -> tuple[np.ndarray, pb.Header, tuple[tuple[str, int], ...]]:
        """One PullConsensus stream, assembled into (matrix, header, contributors); ChunkError for a malformed stream."""
        assembler = MatrixAssembler(what, expected_rows=expected_rows)
        async for message in self._pull(request, timeout=timeout):
            assembler.add_serialized(message)
        matrix, header = assembler.result()
        return matrix, header, assembler.contributors
