"""Scatter of predicted score vs MOS with the fitted logistic curve, one panel per dataset.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, safe in worker threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from iqa.metrics import apply_fit


@dataclass(frozen=True)
class Panel:
    name: str
    pred: np.ndarray
    mos: np.ndarray
    metrics: dict  # an `evaluate_scores` result
    failed: np.ndarray | None = None  # images whose samples all failed to parse (drawn apart)


def scatter_plot(panels: list[Panel], path: str | Path, title: str = "") -> Path:
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 4.0 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, panel in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index)
        failed = panel.failed if panel.failed is not None else np.zeros(len(panel.pred), dtype=bool)
        axes.scatter(panel.pred[~failed], panel.mos[~failed], s=10, alpha=0.6, label="images")
        if failed.any():
            axes.scatter(
                panel.pred[failed],
                panel.mos[failed],
                s=14,
                marker="x",
                color="red",
                label="all samples unparsable",
            )
        metrics = panel.metrics
        if metrics.get("fit") in ("logistic4", "linear") and np.ptp(panel.pred) > 0:
            grid = np.linspace(panel.pred.min(), panel.pred.max(), 200)
            curve = apply_fit(metrics["fit"], metrics["fit_params"], grid, float(panel.mos.mean()))
            axes.plot(grid, curve, color="black", linewidth=1.5, label=f"{metrics['fit']} fit")
        axes.set_title(
            f"{panel.name} (n={metrics['n']})\nSRCC {metrics['srcc']:.3f}  PLCC {metrics['plcc']:.3f}",
            fontsize=10,
        )
        axes.set_xlabel("predicted score (mean of samples)")
        axes.set_ylabel("MOS (rescaled to [1, 5])")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
