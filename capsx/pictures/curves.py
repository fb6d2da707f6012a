"""Line plots as arrays (matplotlib, which comes with MLflow; the Agg canvas, so no display
is needed): the accuracy curves of `capsx eval --sweep`, one line per run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy_curves(title: str, xlabel: str, values: Sequence[float],
                    curves: dict[str, Sequence[float]]) -> np.ndarray:
    """(H, W, 3) uint8: accuracy in percent against the transform's value, a line per label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, accuracies in curves.items():
        ax.plot(values, [100 * a for a in accuracies], marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
