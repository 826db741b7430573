"""Metric curves (value against step, one line per key) as a matplotlib figure.

``Figure`` + ``FigureCanvasAgg`` rather than pyplot: no global figure state, no GUI backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def curve_figure(series: Mapping[str, Sequence[tuple[int, float]]]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, label=key, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("value")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure
