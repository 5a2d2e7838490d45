"""Shipped reproduction configs, found by name: `cdimf reproduce warm-sport-cloth`."""
