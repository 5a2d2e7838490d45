"""Embedded data: the paper's Amazon Sport & Cloth pairs (MIT, see amazon-cdr/LICENSE)."""
