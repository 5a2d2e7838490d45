"""Shared code of cdimf: the numerical core (solver, ADMM step, metrics) and helpers used by both sides."""
