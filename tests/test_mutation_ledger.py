"""scripts/mutation.py's ledger: verdicts count only for the source hash they were recorded against, merge, and serialise sorted."""

import ast
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _mutation() -> ModuleType:
    """scripts/mutation.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_a_changed_source_drops_its_verdicts_and_a_comment_keeps_them(tmp_path: Path) -> None:
    """Recorded against one source, verdicts vanish when the code changes, survive a comment, and merge by key."""
    mutation = _mutation()
    source = tmp_path / "core.py"
    source.write_text("def f(x):\n    return x + 1\n")
    # the expectation computed here: sha256 of the syntax tree dumped with positions
    expected_hash = hashlib.sha256(ast.dump(ast.parse("def f(x):\n    return x + 1\n"), include_attributes=True).encode()).hexdigest()
    first = mutation.source_hash(source)
    assert first == expected_hash
    tests = {"tests/test_core.py": "ab"}
    ledger = mutation.record({}, "core.py", first, tests, {
        ("core/ReplaceBinaryOperator_Add_Sub", 0): mutation.Verdict(2, "killed"),
        ("core/NumberReplacer", 0): mutation.Verdict(2, "survived"),
    })
    assert ledger["core.py"]["mutants"] == [["core/NumberReplacer", 0, 2, "survived"], ["core/ReplaceBinaryOperator_Add_Sub", 0, 2, "killed"]]

    source.write_text("def f(x):\n    return x + 1  # mutation: equivalent (a comment)\n")
    assert mutation.source_hash(source) == first
    assert set(mutation.current_verdicts(ledger, "core.py", first)) == {("core/ReplaceBinaryOperator_Add_Sub", 0), ("core/NumberReplacer", 0)}

    source.write_text("def f(x):\n    return x + 2\n")
    changed = mutation.source_hash(source)
    assert changed != first
    assert mutation.current_verdicts(ledger, "core.py", changed) == {}
    assert mutation.current_verdicts(ledger, "other.py", first) == {}
    # a verdict recorded for the new source replaces the old source's, never adds to them
    renewed = mutation.record(ledger, "core.py", changed, tests, {("core/NumberReplacer", 0): mutation.Verdict(2, "killed")})
    assert renewed["core.py"]["mutants"] == [["core/NumberReplacer", 0, 2, "killed"]]
    # a rerun of the same source overwrites its mutant's verdict and keeps the others
    again = mutation.record(ledger, "core.py", first, tests, {("core/NumberReplacer", 0): mutation.Verdict(2, "killed")})
    assert again["core.py"]["mutants"] == [["core/NumberReplacer", 0, 2, "killed"], ["core/ReplaceBinaryOperator_Add_Sub", 0, 2, "killed"]]


def test_the_ledger_is_sorted_json_one_mutant_a_line_and_its_score_counts_timeouts_as_kills(tmp_path: Path) -> None:
    """dump_ledger round-trips, does not depend on insertion order, and the tally is the hand count."""
    mutation = _mutation()
    verdicts = {
        ("b", 1): mutation.Verdict(9, "survived"),
        ("a", 2): mutation.Verdict(3, "timeout"),
        ("a", 1): mutation.Verdict(3, "killed"),
        ("c", 0): mutation.Verdict(1, "killed"),
    }
    one = mutation.record({}, "z.py", "h1", {"t2.py": "2", "t1.py": "1"}, verdicts)
    one = mutation.record(one, "a.py", "h2", {"t.py": "0"}, {})
    other = mutation.record({}, "a.py", "h2", {"t.py": "0"}, {})
    other = mutation.record(other, "z.py", "h1", {"t1.py": "1", "t2.py": "2"}, dict(reversed(list(verdicts.items()))))
    text = mutation.dump_ledger(one)
    assert text == mutation.dump_ledger(other)
    parsed = json.loads(text)
    assert list(parsed["targets"]) == ["a.py", "z.py"]
    assert parsed["targets"]["z.py"]["mutants"] == [["a", 1, 3, "killed"], ["a", 2, 3, "timeout"], ["b", 1, 9, "survived"], ["c", 0, 1, "killed"]]
    assert '        ["b", 1, 9, "survived"],' in text.splitlines()
    path = tmp_path / "ledger.json"
    path.write_text(text)
    assert mutation.load_ledger(path) == parsed["targets"]
    assert mutation.load_ledger(tmp_path / "none.json") == {}
    # in scope: all four plus one never run; ("c", 0) is out of scope (a line since marked equivalent)
    counts = mutation.tally(verdicts, {("a", 1), ("a", 2), ("b", 1), ("d", 0)})
    assert counts == {"killed": 1, "timeout": 1, "survived": 1, "unrun": 1}
    assert mutation.score(counts) == 100.0 * 2 / 3
    assert mutation.score({"killed": 0, "timeout": 0, "survived": 0, "unrun": 5}) is None


def test_the_committed_ledger_holds_only_known_targets_and_outcomes() -> None:
    """Every target the committed ledger names is in TARGETS, each verdict one of the three outcomes."""
    mutation = _mutation()
    ledger = mutation.load_ledger(mutation.LEDGER)
    assert set(ledger) <= {target.path for target in mutation.TARGETS}
    for entry in ledger.values():
        assert {outcome for _, _, _, outcome in entry["mutants"]} <= set(mutation.OUTCOMES)
        assert len({(operator, occurrence) for operator, occurrence, _, _ in entry["mutants"]}) == len(entry["mutants"])
