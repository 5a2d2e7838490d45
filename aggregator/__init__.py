"""The aggregator: admits domains, computes the consensus Z over shared users and streams it back."""
