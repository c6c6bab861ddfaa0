"""PNG plots: training curves, per-view teacher accuracy and agreement, the views study. matplotlib with the non-
interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdcache.errors import KdcacheError  # noqa: E402


def _save(fig, axes, path: str | Path) -> Path:
    """Grid every axis, lay out, write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise KdcacheError(f"cannot write the plot {path} ({exc.strerror or exc}): choose a writable path") from None
    finally:
        plt.close(fig)
    return Path(path)


def _per_view(series: list[tuple[str, list[float], str]], title: str, path: str | Path) -> Path:
    """One line per (label, fractions per view, style), in percent against the view index."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, values, style in series:
        ax.plot(range(len(values)), [100 * x for x in values], style, label=label)
    ax.set(xlabel="view index", ylabel="%", title=title)
    ax.legend(fontsize=8)
    return _save(fig, [ax], path)


def plot_training(runs: dict[str, list[dict[str, float]]], path: str | Path, reference: float | None = None) -> Path:
    """Test top-1 and train loss per epoch for one or more runs, in one PNG."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in runs.items():
        ep = [h["epoch"] for h in hist]
        ax1.plot(ep, [h["test_top1"] for h in hist], label=label)
        ax2.plot(ep, [h["train_loss"] for h in hist], label=label)
    if reference is not None:
        ax1.axhline(reference, color="k", ls="--", lw=1, label="teacher")
    ax1.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax2.set(xlabel="epoch", ylabel="train loss", title="training loss", yscale="log")
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, [ax1, ax2], path)


def plot_views(top1: list[float], confidence: list[float], path: str | Path) -> Path:
    """Per-view teacher top-1 and mean max-probability of a cache."""
    return _per_view([("top-1 (%)", top1, ".-"), ("mean confidence (%)", confidence, ".-")], "teacher per view", path)


def plot_agreement(top1: list[list[float]], agree: list[float], path: str | Path) -> Path:
    """Per-view top-1 of each teacher and the share of samples on which all teachers agree."""
    series = [(f"teacher {j + 1} top-1", t, ".-") for j, t in enumerate(top1)] + [("all teachers agree", agree, "k.-")]
    return _per_view(series, "teachers per view", path)


def plot_views_study(points, path: str | Path, epochs: int) -> Path:
    """Final and best test top-1 against the number of cached views (log2 axis), online teacher as a reference line."""
    cached = [p for p in points if p.views is not None]
    online = [p for p in points if p.views is None]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p.views for p in cached]
    ax.plot(xs, [p.final_top1 for p in cached], "o-", label="from cache, final epoch")
    ax.plot(xs, [p.best_top1 for p in cached], ".--", alpha=0.6, label="from cache, best epoch")
    if online:
        ax.axhline(online[0].final_top1, color="k", ls="--", lw=1, label="online teacher, final epoch")
    ax.axvline(epochs, color="grey", ls=":", lw=1, label=f"views = epochs ({epochs})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(plt.FixedLocator(xs))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{int(x)}"))
    ax.set(xlabel="cached views per sample", ylabel="test top-1 (%)", title="student accuracy vs cached views")
    ax.legend(fontsize=8)
    return _save(fig, [ax], path)
