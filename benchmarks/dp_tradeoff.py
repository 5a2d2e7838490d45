"""Quality against privacy: test HR@10 / NDCG@10 on the shipped warm Sport & Cloth pair against epsilon at delta = 1e-5.

    python benchmarks/dp_tradeoff.py [--rank 32] [--rounds 10] [--clip-norm 1.0] [--noise 0.05 0.2 1 2 5]
                                     [--figure docs/figures/dp-tradeoff.png] [--table docs/results/dp-tradeoff.md]

The in-process engine (the same privatize step a node runs before it pushes, seeded per
domain and round) with `cdimf simulate`'s defaults but a modest size: the warm pair's CDIMF
hyperparameters (alpha 0.01, lam 1, nu 0), identity prox, rho 1, one epoch per round, rank
32 and 10 rounds. Both domains clip every pushed row of X + U to the same L2 norm (1.0 by
default: the median row norm of the run without DP is about 0.8 at rank 32) and add Gaussian
noise of std multiplier * 2 * clip_norm; epsilon is dp-accounting's RDP accountant over the
rounds. Baselines measured in the same run: CDIMF without DP (no clipping, no noise), CDIMF
with clipping alone (no guarantee), and rho = 0 (each domain trains alone and nothing it
sends is used: the floor any private federation should beat). Test metrics: the paper's
protocol (each test item against 999 sampled negatives). Writes a PNG and a markdown table.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cdimf.common.core.evaluation import evaluate  # noqa: E402
from cdimf.common.core.params import ADMMParams, PrivacyParams  # noqa: E402
from cdimf.common.privacy_accounting import gaussian_epsilon  # noqa: E402
from cdimf.domain_node.node_data import NodeData, load_node_data  # noqa: E402
from cdimf.engine import CDIMFEngine, DomainInput  # noqa: E402
from cdimf.simulate import SimulateConfig  # noqa: E402

DELTA = 1e-5
NOISE_SEED = 0


@dataclass(frozen=True)
class Setting:
    """One arm: its label, its privacy settings (both domains alike) and its ADMM rho."""

    label: str
    privacy: PrivacyParams
    rho: float = 1.0


@dataclass(frozen=True)
class Outcome:
    """One arm's epsilon (None: no guarantee; 0: nothing leaves) and each domain's test HR@10 / NDCG@10."""

    setting: Setting
    epsilon: float | None
    metrics: dict[str, dict[str, float]]
    seconds: float


def load_warm_pair() -> list[NodeData]:
    """The shipped warm Sport & Cloth pair as each node loads it (validation carved from train, test with 999 negatives)."""
    return [load_node_data(d.name, d.train_path, d.valid_path, d.test_path, d.data_format) for d in SimulateConfig().domains]


def trained_engine(data: list[NodeData], privacy: PrivacyParams, rank: int, rounds: int, rho: float = 1.0,
                   quantize: bool = False) -> CDIMFEngine:
    """The engine on the warm pair with simulate's local model at `rank`, both domains under `privacy`, after `rounds` rounds.

    quantize: secure aggregation's fixed-point consensus (the Z of a masked run).
    """
    config = SimulateConfig()
    ials = config.ials.at_rank(rank)
    engine = CDIMFEngine([DomainInput(d.domain, d.users.keys, d.train, ials, privacy=privacy) for d in data],
                         ADMMParams(rho=rho, prox="identity"), quantize=quantize)
    engine.run(rounds)
    return engine


def epsilon_of(privacy: PrivacyParams, rounds: int, rho: float) -> float | None:
    """The run's epsilon at DELTA: 0 when nothing sent is used (rho = 0), None without noise (no guarantee)."""
    if rho == 0:
        return 0.0
    if not privacy.noisy:
        return None
    return gaussian_epsilon(privacy.noise_multiplier, rounds, privacy.delta)


def measure(data: list[NodeData], setting: Setting, rank: int, rounds: int) -> Outcome:
    """Train one arm and evaluate every domain on its test split."""
    started = time.perf_counter()
    engine = trained_engine(data, setting.privacy, rank, rounds, setting.rho)
    metrics = {d.domain: evaluate(d.test, t.scoring_users(), t.state.items, d.train, 10) for d, t in zip(data, engine.trainers)
               if d.test is not None}
    return Outcome(setting, epsilon_of(setting.privacy, rounds, setting.rho), metrics, time.perf_counter() - started)


def settings(clip_norm: float, noise: list[float]) -> list[Setting]:
    """No DP, clipping alone, each noise multiplier, and rho = 0."""
    arms = [Setting("CDIMF, no DP", PrivacyParams()), Setting(f"clip {clip_norm:g}, no noise", PrivacyParams(clip_norm=clip_norm))]
    arms += [Setting(f"clip {clip_norm:g}, noise x{z:g}", PrivacyParams(clip_norm=clip_norm, noise_multiplier=z, delta=DELTA, noise_seed=NOISE_SEED))
             for z in noise]
    return [*arms, Setting("rho = 0 (no exchange)", PrivacyParams(), rho=0.0)]


def shown_epsilon(epsilon: float | None) -> str:
    """The table's epsilon cell."""
    return "inf (no guarantee)" if epsilon is None else f"{epsilon:.2f}"


def table(outcomes: list[Outcome], rank: int, rounds: int) -> str:
    """The markdown table: one row per arm, each domain's test HR@10 / NDCG@10 in % and its ratio to CDIMF without DP."""
    base = outcomes[0].metrics
    names = list(base)
    head = "| setting | epsilon (delta 1e-5) | " + " | ".join(f"{n} HR@10 | {n} NDCG@10 | {n} NDCG@10 / no DP" for n in names) + " |"
    lines = [f"Warm Sport & Cloth, engine, rank {rank}, {rounds} rounds, test metrics (999 sampled negatives), seeded noise.", "",
             head, "|" + "---|" * (2 + 3 * len(names))]
    for outcome in outcomes:
        cells = []
        for name in names:
            m = outcome.metrics[name]
            cells += [f"{100 * m['HR@10']:.2f}", f"{100 * m['NDCG@10']:.2f}", f"{m['NDCG@10'] / base[name]['NDCG@10']:.3f}"]
        lines.append(f"| {outcome.setting.label} | {shown_epsilon(outcome.epsilon)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(outcomes: list[Outcome], path: Path, rank: int, rounds: int) -> Path:
    """NDCG@10 and HR@10 against epsilon per domain, with the no-DP and rho = 0 levels as references (the project's chart style)."""
    from cdimf.plotting import require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    noisy = [o for o in outcomes if o.epsilon is not None and o.setting.rho > 0]
    plain = outcomes[0]
    alone = next(o for o in outcomes if o.setting.rho == 0)
    names = list(plain.metrics)
    fig = Figure(figsize=(4.6 * 2, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
        for index, name in enumerate(names):
            color = f"C{index}"
            ax.plot([o.epsilon for o in noisy], [100 * o.metrics[name][metric] for o in noisy], marker="o", markersize=3, linewidth=1.5,
                    color=color, label=f"{name}, DP")
            ax.axhline(100 * plain.metrics[name][metric], color=color, linestyle="--", linewidth=1, label=f"{name}, no DP")
            ax.axhline(100 * alone.metrics[name][metric], color=color, linestyle=":", linewidth=1, label=f"{name}, rho = 0")
        ax.set_xscale("log")
        ax.set_title(f"test {metric} (999 neg) against epsilon", fontsize=10)
        ax.set_xlabel("epsilon at delta 1e-5 (log)")
        ax.set_ylabel(f"{metric} %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"DP on the pushed X + U: warm Sport & Cloth, rank {rank}, {rounds} rounds", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main() -> None:
    """Run every arm, print the table, write the PNG and the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.2, 1.0, 2.0, 5.0], help="noise multipliers")
    parser.add_argument("--figure", type=Path, default=REPO_ROOT / "docs/figures/dp-tradeoff.png")
    parser.add_argument("--table", type=Path, default=REPO_ROOT / "docs/results/dp-tradeoff.md")
    args = parser.parse_args()
    data = load_warm_pair()
    outcomes = []
    for setting in settings(args.clip_norm, args.noise):
        outcomes.append(measure(data, setting, args.rank, args.rounds))
        print(f"{setting.label}: epsilon {shown_epsilon(outcomes[-1].epsilon)}, {outcomes[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    text = table(outcomes, args.rank, args.rounds)
    print(text)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(f"wrote {figure(outcomes, args.figure, args.rank, args.rounds)} and {args.table}", file=sys.stderr)


if __name__ == "__main__":
    main()
