"""Protocol definitions and the generated gRPC code."""
