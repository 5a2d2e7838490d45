"""Security: pseudonyms, certificates, per-call proofs, the party-name rule."""
