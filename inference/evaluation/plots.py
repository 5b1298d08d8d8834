"""Matplotlib figures written into a run directory (Agg backend: no display needed)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


MISSING_RGB = (0.35, 0.45, 0.85)  # how unobserved pixels are drawn
DPI = 90


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _to_display(images: torch.Tensor, observed: Optional[torch.Tensor] = None) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, H, W)`` grey or ``(N, H, W, 3)`` colour, for imshow.

    With ``observed`` (bool, the shape of ``images``), pixels not observed in any channel are drawn in
    :data:`MISSING_RGB`.
    """
    images = images.detach().float().cpu().clamp(0, 1)
    if observed is None and images.shape[1] == 1:
        return images[:, 0].numpy()
    rgb = images[:, :3].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).clone()  # (N, H, W, 3)
    if observed is not None:
        missing = ~observed.detach().cpu().all(1)  # (N, H, W)
        rgb[missing] = torch.tensor(MISSING_RGB)
    return rgb.numpy()


FRAME_GREY = 0.55  # the thin frame drawn around each image, so white image borders stay visible
MIN_FIGURE_WIDTH = 5.0  # inches: room for a title and row labels beside a strip of few images
BORDER = 2  # pixels of the frame around each image (coloured where an image is marked)


def _strip(shown: np.ndarray, num_cols: int, colours: Optional[Sequence[Optional[Tuple[float, float, float]]]] = None) -> np.ndarray:
    """Images ``(n, H, W)`` or ``(n, H, W, 3)`` side by side in one array, each in a grey frame (in
    ``colours[c]`` where given: the image's content is left as it is), padded with white to ``num_cols``."""
    if colours is not None and any(c is not None for c in colours) and shown.ndim == 3:
        shown = np.repeat(shown[..., None], 3, axis=-1)  # grey -> RGB, so that a frame can be coloured
    n, height, width = shown.shape[:3]
    step = width + BORDER
    strip = np.ones((height + 2 * BORDER, num_cols * step + BORDER, *shown.shape[3:]))  # white
    for c in range(n):
        left = c * step
        colour = colours[c] if colours is not None else None
        strip[:, left : left + width + 2 * BORDER] = FRAME_GREY if colour is None else colour
        strip[BORDER : height + BORDER, left + BORDER : left + width + BORDER] = shown[c]
    return strip


def image_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], path: str, title: Optional[str] = None,
               observed: Optional[Sequence[Optional[torch.Tensor]]] = None,
               frame_colours: Optional[Sequence[Optional[Sequence]]] = None) -> str:
    """A grid whose row ``i`` shows the images ``rows[i] (N, C, H, W)``, labelled ``labels[i]``;
    ``observed[i]`` (optional bool masks) marks row ``i``'s missing pixels in colour; ``frame_colours[i]``
    (optional, one RGB or None per image) colours the frame around marked images, their content shown as
    it is. Each row is one image (its frames tiled), so a strip of many frames costs one ``imshow``."""
    num_cols = max(r.shape[0] for r in rows)
    width = max(1.1 * num_cols + 1.0, MIN_FIGURE_WIDTH)  # a strip of one image still fits its title and labels
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 1.15 * len(rows) + 0.4), squeeze=False)
    observed = list(observed) if observed is not None else [None] * len(rows)
    frame_colours = list(frame_colours) if frame_colours is not None else [None] * len(rows)
    for r, (images, label) in enumerate(zip(rows, labels)):
        ax = axes[r, 0]
        ax.imshow(_strip(_to_display(images, observed[r]), num_cols, frame_colours[r]), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9, wrap=True)
    return _save(fig, path)


def image_grid(images: torch.Tensor, path: str, num_cols: int = 8, title: Optional[str] = None) -> str:
    """Images ``(N, C, H, W)`` tiled ``num_cols`` to a row."""
    rows = [images[i : i + num_cols] for i in range(0, images.shape[0], num_cols)]
    return image_rows(rows, [""] * len(rows), path, title)


def bars(values: torch.Tensor, path: str, title: str, xlabel: str, ylabel: str, line: Optional[float] = None) -> str:
    """A bar per entry of ``values (D,)``; an optional horizontal reference ``line``."""
    values = values.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(6.5, 0.12 * len(values) + 2), 3.2))
    ax.bar(np.arange(len(values)), values, color="tab:blue")
    if line is not None:
        ax.axhline(line, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


def bars_by_name(values: Dict[str, float], path: str, title: str, ylabel: str,
                 spread: Optional[Dict[str, Tuple[float, float]]] = None) -> str:
    """A labelled bar per entry of ``values`` (name -> number), its value written on it; ``spread`` (name ->
    (low, high)), where given, is drawn as an error bar from low to high."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(values) + 1.5), 3.2))
    names, numbers = list(values), [values[k] for k in values]
    errors = None
    if spread is not None:  # matplotlib's yerr: distances below and above each bar, shape (2, bars)
        errors = [[values[k] - spread[k][0] for k in names], [spread[k][1] - values[k] for k in names]]
    bars = ax.bar(names, numbers, color="tab:blue", yerr=errors, capsize=4)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in numbers], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, wrap=True)
    return _save(fig, path)


def curves(metrics: List[Dict], keys: Sequence[str], path: str, title: str = "training curves") -> str:
    """Each of ``keys`` against the epoch, from ``metrics.jsonl`` records."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in keys:  # the epochs that scored it (eval_every)
        rows = [m for m in metrics if m.get(key) is not None]
        if rows:
            ax.plot([m["epoch"] for m in rows], [m[key] for m in rows], marker="o" if len(rows) < 50 else None,
                    markersize=3, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def read_metrics(run_path: str) -> List[Dict]:
    with open(os.path.join(run_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def weight_panels(weights: torch.Tensor, path: str, title: str) -> str:
    """One panel per sequence of mixture weights ``weights (n, T, K)`` against time (stacked areas)."""
    weights = weights.detach().cpu().numpy()
    n, steps, k = weights.shape
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.5, 2.6), squeeze=False, sharey=True)
    for i, ax in enumerate(axes[0]):
        ax.stackplot(np.arange(1, steps + 1), weights[i].T, labels=[f"k={j + 1}" for j in range(k)], alpha=0.85)
        ax.set_xlabel("t")
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("alpha_t")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def trajectories(points: torch.Tensor, path: str, title: str) -> str:
    """Paths of ``points (n, T, 2)`` (first two coordinates), coloured by time, one colour map per path."""
    points = points.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for i in range(points.shape[0]):
        ax.plot(points[i, :, 0], points[i, :, 1], color="grey", linewidth=0.6, alpha=0.6)
        ax.scatter(points[i, :, 0], points[i, :, 1], c=np.arange(points.shape[1]), cmap="viridis", s=10)
    ax.set_xlabel("a[0]")
    ax.set_ylabel("a[1]")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def error_curves(x_values, series: Dict[str, Sequence[float]], path: str, xlabel: str, title: str,
                 ylabel: str) -> str:
    """Imputation error (``ylabel``: the metric) against a setting (drop probability or missing frames)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in series.items():
        style = "--" if "floor" in label else "-"
        ax.plot(x_values, values, style, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def boundary_probabilities(probs: torch.Tensor, path: str, title: str, events: Optional[torch.Tensor] = None) -> str:
    """One panel per sequence: the probability that frame t starts a segment, ``probs (n, T)``, against
    t, with the true events ``events (n, T)`` (0/1) as dashed lines when given."""
    probs = probs.detach().cpu().numpy()
    n, steps = probs.shape
    fig, axes = plt.subplots(n, 1, figsize=(6, 1.4 * n + 0.6), squeeze=False, sharex=True)
    for i, ax in enumerate(axes[:, 0]):
        if events is not None:
            for t in np.flatnonzero(events[i].cpu().numpy()):
                ax.axvline(t + 1, color="tab:red", linestyle="--", linewidth=0.8)
        ax.plot(np.arange(1, steps + 1), probs[i], marker="o", markersize=3)
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel("q(start)")
    axes[-1, 0].set_xlabel("frame t" + (" (dashed: true events)" if events is not None else ""))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def metric_against_time(metrics: List[Dict], key: str, path: str, title: str) -> str:
    """``key`` of each epoch's record against the cumulative training time (the records' ``time_s``)."""
    minutes = np.cumsum([m["time_s"] for m in metrics]) / 60.0
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(minutes, [m[key] for m in metrics], marker="o", markersize=3)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)
