"""gRPC plumbing: channels and servers, authorisation, the aggregator client."""
