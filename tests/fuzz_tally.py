"""What the fuzz properties tried, per kind of input: accepted or refused cleanly (a refusal of another kind fails the test).

scripts/fuzz_soak.py sets FUZZ_TALLY to a file; the counts are written there when the test process ends.
"""

import atexit
import json
import os
from pathlib import Path

TALLY: dict[str, dict[str, int]] = {}


def count(kind: str, outcome: str) -> None:
    """One input of `kind` ended `outcome` ("accepted" or "refused")."""
    bucket = TALLY.setdefault(kind, {"accepted": 0, "refused": 0})
    bucket[outcome] = bucket.get(outcome, 0) + 1


def _write() -> None:
    """The tally into FUZZ_TALLY (merged with what an earlier process of the same soak wrote)."""
    target = Path(os.environ["FUZZ_TALLY"])
    merged: dict[str, dict[str, int]] = json.loads(target.read_text()) if target.exists() and target.stat().st_size else {}
    for kind, outcomes in TALLY.items():
        for outcome, value in outcomes.items():
            merged.setdefault(kind, {}).setdefault(outcome, 0)
            merged[kind][outcome] += value
    target.write_text(json.dumps(merged, indent=2, sort_keys=True))


if os.environ.get("FUZZ_TALLY"):
    atexit.register(_write)
