"""Make each hand-named mutation of the core formulas and protocol constants, run the test that must kill it, restore.

    python scripts/named_mutations.py          # every mutation; exit 1 when one survives

Each mutation is one text replacement in one source file (edited in place, restored in a
`finally`, byte for byte, so run it in a clean work tree and not next to other work).
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """A wrong formula or constant, and the test that must fail under it."""

    name: str
    path: str
    old: str
    new: str
    test: str


KNOWN = "tests/test_known_answers.py::"
MUTATIONS = [
    Mutation("alpha dropped from the ridge", "common/core/ials.py",
             "lam * np.power(counts + alpha * n_other, nu)", "lam * np.power(counts + n_other, nu)",
             KNOWN + "test_frequency_ridge_is_lambda_times_count_plus_alpha_times_catalog_to_the_nu"),
    Mutation("X - U pushed instead of X + U", "common/core/model.py",
             "(self.state.users[self.shared_rows] + self.state.duals)", "(self.state.users[self.shared_rows] - self.state.duals)",
             KNOWN + "test_the_contribution_is_x_plus_u_the_dual_step_adds_x_minus_z_and_the_target_is_z_minus_u"),
    Mutation("X - U pushed instead of X + U (engine vs the reference)", "common/core/model.py",
             "(self.state.users[self.shared_rows] + self.state.duals)", "(self.state.users[self.shared_rows] - self.state.duals)",
             "tests/test_reference_cdimf.py::test_the_engine_follows_the_dense_reference_round_by_round"),
    Mutation("dual step halved", "common/core/admm.py",
             "(duals + local - consensus_rows)", "(duals + (local - consensus_rows) / 2)",
             KNOWN + "test_the_admm_functions_on_literals"),
    Mutation("dual step halved (engine vs the reference)", "common/core/admm.py",
             "(duals + local - consensus_rows)", "(duals + (local - consensus_rows) / 2)",
             "tests/test_reference_cdimf.py::test_the_engine_follows_the_dense_reference_round_by_round"),
    Mutation("999 -> 99 test negatives", "common/core/evaluation.py", "PAPER_NEGATIVES = 999", "PAPER_NEGATIVES = 99",
             KNOWN + "test_the_paper_protocol_ranks_each_target_among_1000_candidates_and_validation_among_100"),
    Mutation("99 -> 49 validation negatives", "common/config.py", "VALID_NEGATIVES = 99", "VALID_NEGATIVES = 49",
             KNOWN + "test_the_paper_protocol_ranks_each_target_among_1000_candidates_and_validation_among_100"),
    Mutation("proof window 300 s -> 1800 s", "common/security/call_proof.py", "PROOF_WINDOW_S = 300.0", "PROOF_WINDOW_S = 1800.0",
             KNOWN + "test_a_call_proof_is_accepted_within_300_seconds_of_the_server_clock_and_refused_beyond"),
    Mutation("HMAC-SHA256 replaced by sha256(secret + key)", "common/security/pseudonyms.py",
             'hmac.digest(secret, _CONTEXT + _key_bytes(key), "sha256")', "hashlib.sha256(secret + _CONTEXT + _key_bytes(key)).digest()",
             KNOWN + "test_pseudonyms_are_hmac_sha256_of_the_context_and_the_key_under_the_secret"),
    Mutation("flags and environment variables swapped", "common/config.py",
             "layers = [*_env_overrides(model, os.environ if environ is None else environ, env_prefix), *overrides]",
             "layers = [*overrides, *_env_overrides(model, os.environ if environ is None else environ, env_prefix)]",
             "tests/test_documented_promises.py::test_flags_beat_environment_variables_which_beat_the_file_which_beats_the_default"),
    Mutation("node's graceful NOT_SERVING removed", "domain_node/service.py",
             "        await self.health.enter_graceful_shutdown()\n", "",
             "tests/test_documented_promises.py::test_a_node_reports_not_serving_as_soon_as_it_starts_shutting_down"),
]


def _clean_environment() -> dict[str, str]:
    """This environment without CDIMF_* variables (they would change what the tests load)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("CDIMF_")}


def killed(mutation: Mutation) -> bool:
    """Apply the mutation, run its test (fresh bytecode), restore the file; True when the test failed."""
    path = ROOT / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.path}: the text of mutation {mutation.name!r} is not there exactly once")
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        result = subprocess.run([sys.executable, "-B", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutation.test],
                                cwd=ROOT, capture_output=True, text=True, env={**_clean_environment(), "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        path.write_bytes(original)
    return result.returncode != 0


def main() -> int:
    """Run every mutation; print one line each; 1 when one survived."""
    # stale bytecode of a same-size mutant would be used instead of the mutated source
    for cache in ROOT.glob("*/**/__pycache__"):
        for compiled in cache.glob("*.pyc"):
            compiled.unlink()
    survivors = 0
    for mutation in MUTATIONS:
        dead = killed(mutation)
        survivors += not dead
        print(f"{'killed  ' if dead else 'SURVIVED'} {mutation.name}  <- {mutation.test}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
