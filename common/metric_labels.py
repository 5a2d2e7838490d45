"""How every metric is shown: its split and protocol in its name (`valid NDCG@10 (99 neg)`), its value in percent.

Metrics are computed as fractions (common/core/evaluation.py); this module is the one place
that turns them into what the command line, the logs and JSON show, so that a per-round
validation number is never mistaken for a test number under another protocol.
"""

from collections.abc import Mapping

# keys a metrics report may carry besides metrics: the negatives it ranked against, the model's round
NEGATIVES_KEY = "negatives"
# a node with differential privacy adds the (epsilon, delta) of what it pushed so far
DP_EPSILON_KEY = "dp_epsilon"
DP_DELTA_KEY = "dp_delta"
NOT_METRICS = frozenset({NEGATIVES_KEY, "round", "users", DP_EPSILON_KEY, DP_DELTA_KEY})


def protocol_of(negatives: int | None) -> str:
    """`(99 neg)` for the sampled protocol, `(full catalog)` for none."""
    return f"({negatives} neg)" if negatives else "(full catalog)"


def metric_label(name: str, split: str, negatives: int | None) -> str:
    """`valid NDCG@10 (99 neg)`; a name labelled "full ..." is the full-catalog protocol, "unseen ..." DisenCDR/UniCDR's.

    The unseen protocol draws its negatives among the items the user neither trained on nor
    holds in test: `test HR@10 (999 unseen neg)`.
    """
    if name.startswith("full "):
        return f"{split} {name.removeprefix('full ')} (full catalog)"
    if name.startswith("unseen "):
        return f"{split} {name.removeprefix('unseen ')} ({negatives} unseen neg)"
    return f"{split} {name} {protocol_of(negatives)}"


def labelled_percent(metrics: Mapping[str, float], split: str, negatives: int | None = None) -> dict[str, float]:
    """{label: value in %} of a report of fractions; `negatives` defaults to the report's own NEGATIVES_KEY."""
    if negatives is None and NEGATIVES_KEY in metrics:
        negatives = int(metrics[NEGATIVES_KEY])
    return {metric_label(name, split, negatives): round(100.0 * float(value), 4) for name, value in sorted(metrics.items())
            if name not in NOT_METRICS}


def privacy_shown(epsilon: float, delta: float) -> str:
    """`DP epsilon 2.8140 at delta 1e-05`, or "" when delta is 0 (no noise, no guarantee)."""
    return f"DP epsilon {epsilon:.4f} at delta {delta:g}" if delta > 0 else ""


def shown(metrics: Mapping[str, float], split: str, negatives: int | None = None) -> str:
    """One line: `valid HR@10 (99 neg) 21.25%  valid NDCG@10 (99 neg) 12.00%`, and a report's DP epsilon when it has one."""
    parts = [f"{label} {value:.2f}%" for label, value in labelled_percent(metrics, split, negatives).items()]
    privacy = privacy_shown(metrics.get(DP_EPSILON_KEY, 0.0), metrics.get(DP_DELTA_KEY, 0.0))
    return "  ".join([*parts, privacy] if privacy else parts)
