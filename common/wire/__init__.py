"""Wire formats: the chunked matrix codec and every pydantic <-> protobuf conversion."""
