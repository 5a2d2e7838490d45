"""CI's container tier, check half: fail unless every container-tier test ran and passed (none skipped)."""

import sys
import xml.etree.ElementTree as ET

EXPECTED_AT_LEAST = 10


def main(report: str) -> int:
    """Exit 1 when the JUnit report shows the tier's tests missing, skipped or failed."""
    cases = [case for case in ET.parse(report).iter("testcase") if ".test_docker_" in case.get("classname", "")]
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in cases if len(case)]
    print(f"container tier: {len(cases)} tests, {len(bad)} not passed")
    if len(cases) < EXPECTED_AT_LEAST or bad:
        print("\n".join(bad) or f"expected at least {EXPECTED_AT_LEAST} container-tier tests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
