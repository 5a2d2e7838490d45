"""Compare CDIMF's user step forms ('paper' vs the authors' 'reference-code') on validation only.

    python scripts/compare_user_step.py [CONFIG] [--rank 64] [--valid-negatives 999]

Each form trains with early stopping on the validation split (never test) and prints its best
mean validation NDCG@10 over the domains.
"""

import argparse
import time

from cdimf.reproduce import CDIMF, early_stopped, held_out, load_splits
from cdimf.reproduce_config import ReproduceConfig, load_reproduce_config

FORMS = (("paper", 1.0), ("reference-code", 1.0), ("reference-code", 3.0))


def with_form(config: ReproduceConfig, user_step: str, rho: float, rank: int) -> ReproduceConfig:
    """The config with CDIMF's user step, rho and rank replaced."""
    cdimf = config.cdimf.model_copy(
        update={
            "user_step": user_step,
            "admm": config.cdimf.admm.model_copy(update={"rho": rho}),
            "ials": config.cdimf.ials.model_copy(update={"rank": rank}),
        }
    )
    return config.model_copy(update={"cdimf": cdimf})


def main() -> None:
    """Train each form on the validation split and print its best score."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/warm-sport-cloth.toml")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--valid-negatives", type=int, default=999)
    args = parser.parse_args()
    config = load_reproduce_config(args.config)
    splits, _ = load_splits(config)
    valid = [held_out(s, "valid", args.valid_negatives, config.evaluation.seed) for s in splits]
    for user_step, rho in FORMS:
        candidate = with_form(config, user_step, rho, args.rank)
        started = time.perf_counter()
        model = CDIMF([s.train for s in splits], candidate, splits[0].users.keys)
        rounds, _, history = early_stopped(model, valid, [s.train for s in splits], candidate)
        print(
            f"{user_step:<15} rho {rho:<4} best validation NDCG@10 {100 * max(history):.2f} % "
            f"at round {rounds} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
