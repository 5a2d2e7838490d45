"""Numerical core: iALS, the local model, ADMM consensus, membership, metrics (numpy/scipy only)."""
