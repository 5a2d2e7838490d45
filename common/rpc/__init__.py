"""gRPC plumbing: channels and servers, authorisation, the zero-copy push/pull path, the aggregator client."""
