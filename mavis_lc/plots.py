"""Pareto plots of mean rewards per weight setting (PNG, via matplotlib's Agg backend)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FrontPoint:
    """One weight setting's mean rewards on two objectives, with 95% confidence half-widths."""

    label: str
    x: float
    y: float
    x_err: float = 0.0
    y_err: float = 0.0


def pareto_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
    """The points no other point beats on both axes (higher is better), sorted by x."""
    front = [p for p in points if not any(q.x >= p.x and q.y >= p.y and (q.x, q.y) != (p.x, p.y) for q in points)]
    return sorted(front, key=lambda p: p.x)


def save_fronts_plot(
    series: Mapping[str, Sequence[FrontPoint]], path: str | Path, *, x_label: str, y_label: str, title: str
) -> Path:
    """Write one scatter with error bars per method in ``series``, each with its Pareto front
    drawn dashed and labelled with the series name."""
    from mavis_lc.extras import require

    matplotlib = require("matplotlib", "eval", "plotting Pareto fronts")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=120)
    colors = [f"C{i}" for i in range(10)]  # the default colour cycle
    for (name, points), color in zip(series.items(), itertools.cycle(colors)):
        for p in points:
            ax.errorbar(p.x, p.y, xerr=p.x_err, yerr=p.y_err, fmt="o", capsize=2, color=color, alpha=0.8)
            if p.label:
                ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(5, 5), fontsize=7)
        front = pareto_front(points)
        ax.plot([p.x for p in front], [p.y for p in front], "--", color=color, label=name)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target


@dataclass(frozen=True)
class GainPanel:
    """One objective's panel of a gain-against-KL plot: the frontier curve and the methods' points."""

    title: str
    curve: Sequence[tuple[float, float]]
    """(kl, gain) points of the soft best-of-N frontier, up to its reach."""
    points: Mapping[str, Sequence[FrontPoint]]
    """Per method, its rows as (kl_topk, gain) with half-widths."""


def save_gain_kl_plot(panels: Sequence[GainPanel], path: str | Path, *, title: str) -> Path:
    """Write one panel per objective: gain (base SD) against kl_topk (nats), the frontier drawn
    as a line, every method's rows as points with error bars."""
    from mavis_lc.extras import require

    matplotlib = require("matplotlib", "eval", "plotting the KL frontier")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.plot([x for x, _ in panel.curve], [y for _, y in panel.curve], "-", color="black", label="soft best-of-N")
        for (name, points), color in zip(panel.points.items(), itertools.cycle(f"C{i}" for i in range(10))):
            for i, p in enumerate(points):
                ax.errorbar(
                    p.x, p.y, xerr=p.x_err, yerr=p.y_err, fmt="o", capsize=2, color=color, alpha=0.8,
                    label=name if i == 0 else None,
                )  # fmt: skip
                if p.label:
                    ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(5, 5), fontsize=7)
        ax.set_xlabel("kl_topk (nats per response)")
        ax.set_ylabel("gain (base SD)")
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
