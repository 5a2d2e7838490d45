"""The domain node: owns one domain's interactions, trains local iALS and talks to the aggregator."""
