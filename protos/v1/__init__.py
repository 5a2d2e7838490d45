"""Version 1 of the cdimf federation protocol (proto package cdimf.v1)."""
