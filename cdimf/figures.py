"""`cdimf reproduce --figures DIR`: the paper's Figures 2-4 for a pair, as PNGs and one JSON of their curves.

Each curve is CDIMF trained through the in-process engine on the training rows only and scored
after every round on the validation rows (the early-stopping candidates: target + the config's
valid_negatives), never on test. Figure 2 sweeps rho (rho = 0 is ALS per domain with CDIMF's
local model), Figure 3 compares the identity prox with the L2 prox, Figure 4 aggregation periods
1, 2 and 4; every curve runs the same number of local epochs, so the x axis is local epochs.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdimf.common.core.evaluation import HeldOut
from cdimf.common.core.params import ADMMParams
from cdimf.common.metric_labels import metric_label
from cdimf.pairs import DomainSplit
from cdimf.plotting import Line, Panel, render, require_matplotlib
from cdimf.progress import Progress
from cdimf.reproduce import CDIMF, ModelResult, held_out, load_splits, score
from cdimf.reproduce_config import ReproduceConfig

RHO_SWEEP = (0.0, 0.3, 1.0, 3.0, 10.0)
PERIODS = (1, 2, 4)
# L2 prox strengths as multiples of N * rho: Z = mean / (1 + multiple), a mild and a strong shrink
L2_SHRINK_MULTIPLES = (0.1, 1.0)


@dataclass(frozen=True)
class Variant:
    """One CDIMF setting a figure compares: consensus parameters and aggregation period."""

    label: str
    admm: ADMMParams
    period: int

    def key(self) -> tuple[float, str, float, int]:
        """Identical settings share one training run across figures."""
        return (self.admm.rho, self.admm.prox, self.admm.lambda_z, self.period)


@dataclass
class Curve:
    """A variant's validation metric (%) per domain after each round, against local epochs."""

    label: str
    epochs: list[int]
    values: dict[str, list[float]]
    seconds: float


def figure_variants(config: ReproduceConfig) -> dict[str, tuple[str, list[Variant]]]:
    """Figure file stem -> (what it varies, its variants), around the config's own CDIMF settings."""
    own = config.cdimf.admm
    period = config.cdimf.aggregation_period
    n_domains = len(config.domains)
    rhos = sorted({*RHO_SWEEP, own.rho})
    rho_sweep = [Variant(f"rho = {rho:g}" + (" (ALS per domain)" if rho == 0 else ""), own.model_copy(update={"rho": rho}), period) for rho in rhos]
    identity = ADMMParams(rho=own.rho, prox="identity")
    strengths = sorted({*(m * n_domains * own.rho for m in L2_SHRINK_MULTIPLES), *([own.lambda_z] if own.prox == "l2" else [])})
    prox = [Variant("identity prox", identity, period)] + [
        Variant(f"L2 prox, lambda_z = {lz:g}", ADMMParams(rho=own.rho, prox="l2", lambda_z=lz), period) for lz in strengths if lz > 0
    ]
    periods = [Variant(f"aggregation period {p}", own, p) for p in PERIODS]
    return {
        "figure2-rho": (f"by rho ({own.prox} prox)", rho_sweep),
        "figure3-prox": (f"identity vs L2 prox (rho = {own.rho:g})", prox),
        "figure4-period": (f"by aggregation period (rho = {own.rho:g})", periods),
    }


def train_curve(config: ReproduceConfig, splits: Sequence[DomainSplit], valid: Sequence[HeldOut], variant: Variant, epochs: int,
                progress: Progress) -> Curve:
    """Train one variant for `epochs` local epochs on the training rows, scoring validation after each round."""
    k = config.evaluation.k
    trains = [s.train for s in splits]
    cdimf = config.cdimf.model_copy(update={"admm": variant.admm, "aggregation_period": variant.period})
    model = CDIMF(trains, config.model_copy(update={"cdimf": cdimf}), splits[0].users.keys)
    started = time.perf_counter()
    done: list[int] = []
    values: dict[str, list[float]] = {s.name: [] for s in splits}
    for round_no in range(1, epochs // variant.period + 1):
        model.step()
        done.append(round_no * variant.period)
        for split, metrics in zip(splits, score(model.vectors(), valid, trains, k)):
            values[split.name].append(round(100.0 * metrics[f"NDCG@{k}"], 4))
        progress.update(variant.period, f"{variant.label}: {' '.join(f'{n} {v[-1]:.2f}%' for n, v in values.items())}")
    return Curve(variant.label, done, values, round(time.perf_counter() - started, 2))


def model_panel(results: Sequence[dict[str, Any]], title: str, scale: float = 1.0) -> Panel:
    """The reproduce run's own early-stopping curves: each model's validation metric (mean over domains, `scale` x values = %) per round."""
    lines = [Line(r["model"], list(range(1, len(r["validation"]) + 1)), [scale * v for v in r["validation"]]) for r in results if r.get("validation")]
    return Panel(title, "%", "round", lines)


def write_figures(config: ReproduceConfig, folder: Path, epochs: int | None = None,
                  results: Sequence[ModelResult] = ()) -> list[Path]:
    """Train every variant once, write figure2-4 PNGs (one panel per domain), models.png and figures.json into `folder`."""
    require_matplotlib()
    epochs = epochs or config.stopping.max_rounds
    if epochs < max(PERIODS):
        raise ValueError(f"--figures-epochs: the period-{max(PERIODS)} curve needs at least {max(PERIODS)} local epochs, got {epochs}")
    metric = metric_label(f"NDCG@{config.evaluation.k}", "valid", config.stopping.valid_negatives)
    figures = figure_variants(config)
    unique: dict[tuple[float, str, float, int], Variant] = {}
    for _, variants in figures.values():
        for variant in variants:
            unique.setdefault(variant.key(), variant)
    curves: dict[tuple[float, str, float, int], Curve] = {}
    total = sum(epochs // v.period * v.period for v in unique.values())
    # validation rows only: the test files are not even opened
    splits, _ = load_splits(config, with_test=False)
    valid = [held_out(s, "valid", config.stopping.valid_negatives, config.evaluation.seed) for s in splits]
    with Progress("figures", total, "epochs") as progress:
        for key, variant in unique.items():
            curves[key] = train_curve(config, splits, valid, variant, epochs, progress)
    written: list[Path] = []
    stored: dict[str, dict[str, Any]] = {}
    domains = [d.name for d in config.domains]
    for stem, (what, variants) in figures.items():
        panels = [Panel(domain, f"{metric}, %", "local epochs",
                        [Line(v.label, list(map(float, curves[v.key()].epochs)), curves[v.key()].values[domain]) for v in variants])
                  for domain in domains]
        written.append(render(panels, folder / f"{stem}.png", f"{config.title}: {metric} {what}"))
        stored[stem] = {"varies": what, "curves": [{**asdict(curves[v.key()]), "label": v.label} for v in variants]}
    if results:
        history = [{"model": r.model, "validation": r.validation} for r in results]
        written.append(render([model_panel(history, f"mean {metric}", 100.0)], folder / "models.png", f"{config.title}: early stopping of each model"))
    # the best validation value of each curve, per domain: what the figures show at a glance, as numbers
    best = {stem: {c["label"]: {d: float(np.max(c["values"][d])) for d in domains} for c in doc["curves"]} for stem, doc in stored.items()}
    document = {"title": config.title, "metric": metric, "unit": "%", "x": "local epochs", "epochs": epochs, "figures": stored, "best": best}
    (folder / "figures.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return [*written, folder / "figures.json"]
