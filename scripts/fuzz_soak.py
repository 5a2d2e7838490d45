"""The fuzz properties with a bigger budget, then the tally: bad inputs tried, refused cleanly, accepted, failures.

    python scripts/fuzz_soak.py                    # 500 examples per property (CI runs 12-100)
    python scripts/fuzz_soak.py --examples 3000 --timeout-minutes 60

Runs tests/test_fuzz_codec.py, tests/test_fuzz_config.py and tests/test_fuzz_rpc.py under pytest
with FUZZ_EXAMPLES set (random draws instead of CI's fixed ones) and FUZZ_TALLY pointing at a
file the tests count into (tests/fuzz_tally.py). An input is counted once it passed every check
of its property: "refused" means refused cleanly (our error type naming the file, or a clean
gRPC status with the server up and its state unchanged). pytest's own summary line follows.
Bounded by --timeout-minutes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_fuzz_codec.py", "tests/test_fuzz_config.py", "tests/test_fuzz_rpc.py"]


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz tests with the budget and print the tally; exit status is pytest's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="hypothesis examples per property")
    parser.add_argument("--timeout-minutes", type=float, default=45.0, help="stop the whole soak after this long")
    parser.add_argument("--json", action="store_true", help="print the tally as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdimf-fuzz-") as scratch:
        tally_file = Path(scratch) / "tally.json"
        environ = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_TALLY": str(tally_file)}
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0", *FILES],
                                  cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60 * args.timeout_minutes)
        except subprocess.TimeoutExpired:
            print(f"the soak did not end within {args.timeout_minutes} minutes", file=sys.stderr)
            return 1
        tally = json.loads(tally_file.read_text()) if tally_file.exists() else {}
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")
    totals = {"tried": sum(sum(outcomes.values()) for outcomes in tally.values()),
              "refused_cleanly": sum(outcomes.get("refused", 0) for outcomes in tally.values()),
              "accepted": sum(outcomes.get("accepted", 0) for outcomes in tally.values())}
    if args.json:
        print(json.dumps({"examples_per_property": args.examples, "totals": totals, "by_kind": tally, "pytest": summary,
                          "returncode": done.returncode}, indent=2))
    else:
        print(f"{args.examples} examples per property")
        for kind, outcomes in sorted(tally.items()):
            print(f"  {kind}: {sum(outcomes.values())} tried, {outcomes.get('refused', 0)} refused cleanly, "
                  f"{outcomes.get('accepted', 0)} accepted")
        print(f"bad inputs tried {totals['tried']}, refused cleanly {totals['refused_cleanly']}, accepted {totals['accepted']}")
        print(f"pytest: {summary}")
    if done.returncode != 0:
        print(done.stdout[-6000:], file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
