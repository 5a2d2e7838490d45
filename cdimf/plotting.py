"""Line charts of metrics over rounds as PNG files, through matplotlib (the optional `plot` extra)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXTRA_HINT = "pip install 'cdimf[plot]'"


class MissingExtraError(ValueError):
    """An optional feature's extra is not installed; the message names the pip command that adds it."""


@dataclass
class Line:
    """One curve: its legend label and its points."""

    label: str
    x: list[float]
    y: list[float]


@dataclass
class Panel:
    """One chart of a figure: its title, axis labels and curves."""

    title: str
    ylabel: str
    xlabel: str = "round"
    lines: list[Line] = field(default_factory=list)


def require_matplotlib() -> Any:
    """The matplotlib module, or MissingExtraError naming the extra (checked before any long work starts)."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingExtraError(f"plotting needs matplotlib, which is not installed: {EXTRA_HINT}") from error
    return matplotlib


def render(panels: Sequence[Panel], path: Path, title: str = "") -> Path:
    """Draw the panels side by side into a PNG at `path` (folders created); returns the path."""
    if not panels or not any(line.x for panel in panels for line in panel.lines):
        raise ValueError(f"nothing to plot into {path}: no metric has any round")
    require_matplotlib()
    # the object-oriented API with the Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6 * len(panels), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for line in panel.lines:
            ax.plot(line.x, line.y, marker="o" if len(line.x) <= 12 else None, markersize=3, linewidth=1.5, label=line.label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
