"""Evaluation plots uploaded as MLflow artifacts: accuracy over training, and a 2-D embedding map.

The embedding map projects L2-normalised test features onto their first two principal components
(PCA: centre, then the top-2 right singular vectors; Pearson 1901) and colours points by label.
Two components of a 512-D representation hide most of its structure, so the map is a sanity check
(classes should not be one blob), not a measure; kNN and the linear probe are the measures.

Figures are drawn with matplotlib's Agg canvas (no pyplot global state, no display) and uploaded
with the logger's ``log_artifact``; a logger of a non-zero rank does nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

import torch

MAX_SCATTER_POINTS = 5000


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): coordinates on the two directions of largest variance."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"pca_2d: need a (N >= 2, D) feature matrix, got shape {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    components = right[:2].T
    if components.shape[1] < 2:  # one feature dimension: pad with a zero axis
        components = torch.cat([components, components.new_zeros(components.shape[0], 1)], dim=1)
    return (centred @ components).float()


def _new_figure(size=(7, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _upload(logger, figure, artifact_file: str) -> None:
    directory, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        figure.savefig(path)
        logger.log_artifact(path, directory or None)


def accuracy_curve_figure(series: Mapping[str, Sequence[tuple[int, float]]]):
    """Accuracy (in %) against step, one line per named series of ``(step, accuracy in [0, 1])``."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, points in series.items():
        if points:
            steps, values = zip(*points)
            axes.plot(steps, [100 * v for v in values], marker="o", linewidth=1.2, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def embedding_scatter_figure(features: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None = None,
                             title: str = "test embeddings (PCA)", max_points: int = MAX_SCATTER_POINTS):  # fmt: skip
    """A PCA scatter of ``features`` coloured by ``labels``; at most ``max_points`` evenly spaced
    rows are drawn (the projection uses all of them)."""
    coordinates = pca_2d(features.detach().cpu())
    labels = labels.detach().cpu().long()
    keep = torch.linspace(0, len(labels) - 1, min(max_points, len(labels))).long()
    figure = _new_figure((6.5, 5.5))
    axes = figure.add_subplot()
    from matplotlib import colormaps

    colours = colormaps["tab10" if int(labels.max()) < 10 else "tab20"]
    for label in sorted(set(labels[keep].tolist())):
        rows = keep[labels[keep] == label]
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        axes.scatter(coordinates[rows, 0], coordinates[rows, 1], s=4, alpha=0.6, color=colours(label % colours.N), label=name)
    axes.set_title(title)
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.legend(markerscale=3, fontsize=7, loc="best")
    return figure


def log_accuracy_curves(logger, series: Mapping[str, Sequence[tuple[int, float]]], artifact_file: str) -> None:
    """Upload :func:`accuracy_curve_figure` of ``series`` as ``artifact_file`` (skipped when empty)."""
    if logger is None or not any(series.values()):
        return
    _upload(logger, accuracy_curve_figure(series), artifact_file)


def log_embedding_scatter(logger, features: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None,
                          artifact_file: str, title: str = "test embeddings (PCA)") -> None:  # fmt: skip
    """Upload :func:`embedding_scatter_figure` as ``artifact_file``."""
    if logger is None or features.shape[0] < 2:
        return
    _upload(logger, embedding_scatter_figure(features, labels, class_names, title), artifact_file)


def embedding_pair_figure(panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]], class_names: Sequence[str] | None = None,
                          max_points: int = MAX_SCATTER_POINTS):  # fmt: skip
    """Side-by-side PCA scatters, one per ``(title, features, labels)`` panel (e.g. the encoder's
    test features next to the raw pixels'), coloured by label with one shared legend. Each panel
    is projected on its own first two principal components."""
    from matplotlib import colormaps

    figure = _new_figure((5.2 * len(panels) + 1.6, 5.0))
    all_labels = set()
    for index, (title, features, labels) in enumerate(panels):
        coordinates = pca_2d(features.detach().cpu())
        labels = labels.detach().cpu().long()
        keep = torch.linspace(0, len(labels) - 1, min(max_points, len(labels))).long()
        colours = colormaps["tab10" if int(labels.max()) < 10 else "tab20"]
        axes = figure.add_subplot(1, len(panels), index + 1)
        for label in sorted(set(labels[keep].tolist())):
            rows = keep[labels[keep] == label]
            name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
            axes.scatter(coordinates[rows, 0], coordinates[rows, 1], s=3, alpha=0.5, color=colours(label % colours.N),
                         label=None if label in all_labels else name)  # fmt: skip
            all_labels.add(label)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("PC 1")
        axes.set_ylabel("PC 2")
    figure.legend(markerscale=4, fontsize=8, loc="outside right center")
    return figure


def score_bars_figure(scores: Mapping[str, Mapping[str, float]], title: str = ""):
    """Grouped bars: for each measure (e.g. ``kNN top-1``) one bar per representation, accuracies
    in [0, 1] drawn in %, each bar labelled with its value. ``scores``: representation -> measure
    -> accuracy."""
    figure = _new_figure((7, 4))
    axes = figure.add_subplot()
    names = list(scores)
    measures = list(dict.fromkeys(m for values in scores.values() for m in values))
    width = 0.8 / max(len(names), 1)
    lowest = min((v for values in scores.values() for v in values.values()), default=0.0)
    for offset, name in enumerate(names):
        xs = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(measures))]
        values = [100 * scores[name].get(m, float("nan")) for m in measures]
        bars = axes.bar(xs, values, width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    axes.set_xticks(range(len(measures)), measures)
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(max(0.0, 100 * lowest - 8), 100)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    if title:
        axes.set_title(title, fontsize=10)
    return figure


def training_curves_figure(panels: Mapping[str, Sequence[tuple[int, float]]]):
    """One panel per named series of ``(step, value)`` (e.g. ``train/loss`` and ``lr``), side by side."""
    panels = {name: points for name, points in panels.items() if points}
    figure = _new_figure((4.5 * max(len(panels), 1), 3.6))
    for index, (name, points) in enumerate(panels.items()):
        steps, values = zip(*points)
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.plot(steps, values, linewidth=1.2)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return figure


def log_figure(logger, figure, artifact_file: str) -> None:
    """Upload ``figure`` as ``artifact_file`` through ``logger`` (nothing without a logger)."""
    if logger is not None:
        _upload(logger, figure, artifact_file)
