"""PNG plots: training curves, per-view teacher accuracy and agreement, the views study. matplotlib with the non-
interactive Agg backend."""

from __future__ import annotations

import io
from dataclasses import dataclass
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


@dataclass
class Curve:
    """One (method, grid point) of a sweep: mean test top-1 per epoch with its sample std over seeds. Its colour is
    its method's; ``shade`` (0 lightest) picks one of ``shades`` tones of it for the grid point."""

    method: str
    point: str
    epochs: list[int]
    mean: list[float]
    std: list[float]
    n: int
    shade: int = 0
    shades: int = 1


LEGEND_POINTS = 9  # font size of the legend and tick labels: readable when the PNG is shown at half size


def method_colours(methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per method, in the order given: tab10, then tab20, then evenly spaced hues."""
    if len(methods) <= 10:
        palette = [plt.get_cmap("tab10")(i)[:3] for i in range(10)]
    elif len(methods) <= 20:
        palette = [plt.get_cmap("tab20")(i)[:3] for i in range(20)]
    else:
        palette = [plt.get_cmap("hsv")(i / len(methods))[:3] for i in range(len(methods))]
    return {m: (palette[i][0], palette[i][1], palette[i][2]) for i, m in enumerate(methods)}


def shade(colour: tuple[float, float, float], index: int, count: int) -> tuple[float, float, float]:
    """Tone ``index`` of ``count`` of ``colour``: the last is the colour itself, earlier ones are lighter."""
    if count <= 1:
        return colour
    weight = 0.35 + 0.65 * index / (count - 1)
    return tuple(1 - weight * (1 - c) for c in colour)  # type: ignore[return-value]


def _grid_shape(panels: int) -> tuple[int, int]:
    cols = 1 if panels == 1 else 2 if panels <= 4 else 3 if panels <= 9 else 4
    return -(-panels // cols), cols


def _draw_panel(ax, title: str, curves: list[Curve], colours: dict) -> None:
    for c in curves:
        colour = shade(colours[c.method], c.shade, c.shades)
        ax.plot(c.epochs, c.mean, color=colour, lw=1.2)
        low = [m - s for m, s in zip(c.mean, c.std, strict=True)]
        high = [m + s for m, s in zip(c.mean, c.std, strict=True)]
        ax.fill_between(c.epochs, low, high, color=colour, alpha=0.18, lw=0)
    ax.set_title(title, fontsize=LEGEND_POINTS + 1)
    ax.tick_params(labelsize=LEGEND_POINTS - 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    ax.grid(alpha=0.3)


def _legend_handles(methods: list[str], points: list[str], colours: dict) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[m], lw=2.5, label=m) for m in methods]
    if len(points) > 1:
        grey = (0.25, 0.25, 0.25)
        handles += [Line2D([], [], color=shade(grey, i, len(points)), lw=2.5, label=p) for i, p in enumerate(points)]
    return handles


def sweep_figure(panels: dict[str, list[Curve]], methods: list[str], points: list[str], title: str):
    """Small multiples of sweep curves: one panel per key of ``panels`` (a teacher/student pair or a method group), a
    fixed colour per method and a shade of it per grid point, one legend outside the panels. Returns the figure."""
    count = max(len(panels), 1)
    rows, cols = _grid_shape(count)
    size = (8.0, 5.0) if count == 1 else (3.7 * cols, 2.7 * rows + 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    colours = method_colours(methods)
    for ax, (name, curves) in zip(flat, panels.items(), strict=False):
        _draw_panel(ax, name, curves, colours)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        flat[0].text(0.5, 0.5, "no run has finished yet", ha="center", va="center", transform=flat[0].transAxes)
    for i, ax in enumerate(flat[: len(panels) or 1]):
        if i % cols == 0:
            ax.set_ylabel("test top-1 (%)", fontsize=LEGEND_POINTS)
        if i >= len(flat[: len(panels) or 1]) - cols:
            ax.set_xlabel("epoch", fontsize=LEGEND_POINTS)
    fig.suptitle(title, fontsize=LEGEND_POINTS + 2)
    handles = _legend_handles(methods, points, colours) if panels else []
    if handles:
        caption = "colour: method" + (", shade: grid point" if len(points) > 1 else "")
        ncol = min(len(handles), 10 if count > 1 else 5)
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=ncol,
            fontsize=LEGEND_POINTS,
            title=caption,
            title_fontsize=LEGEND_POINTS,
            frameon=False,
        )
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (110 dpi), the figure freed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()
