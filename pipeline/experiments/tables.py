"""``results.md``: a header that says what the numbers are, the paper-shaped tables when a SPEC's methods carry
teacher/student pairs (pairs as columns, methods as rows, as the LS and mdistiller READMEs print them), then one row
per method and grid point with every metric, and the runs in the folder that this SPEC does not name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from kdcache.experiments.results import Pair, Row, RunResult, mean_std, pairs_of

#: Pairs per paper-shaped table: the LS README prints its 14 pairs as two tables of 7.
PAIRS_PER_TABLE = 7
#: config.yaml settings the header states when every run of the report shares them (the training recipe).
RECIPE_KEYS = ("batch-size", "lr", "lr-milestones", "lr-decay-rate", "weight-decay", "momentum", "amp")
_LEFT_OUT_OF_SHARED = ("cache", "cache-scratch", "epochs")  # caches and epochs have lines of their own


def num(value: float, spec: str) -> str:
    """``value`` formatted with ``spec``; ``–`` for a metric the runs did not record (NaN)."""
    return "–" if math.isnan(value) else format(value, spec)


def pm(mean: float, std: float | None) -> str:
    """``71.31 ± 0.42``; ``71.31 ± –`` when there is a single run."""
    return f"{mean:.2f} ± " + ("–" if std is None else f"{std:.2f}")


def count(n: int, what: str) -> str:
    """``1 finished run``, ``3 finished runs``."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def md_line(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def grid_options(runs: list[RunResult]) -> list[str]:
    """Every grid option any run has, sorted: one column each."""
    return sorted({key for run in runs for key in run.grid})


def _flat_row(row: Row, options: list[str]) -> str:
    """One line of the table of every method and grid point."""
    ref = "–" if row.reference is None else f"{row.reference:.2f}"
    delta = "–" if row.delta is None else f"{row.delta:+.2f}"
    return md_line(
        [
            row.method,
            *(row.grid.get(key, "") for key in options),
            row.n,
            pm(*row.last_top1),
            pm(*row.best_top1),
            num(row.mean("top5"), ".2f"),
            num(row.mean("nll"), ".3f"),
            num(row.mean("ece"), ".4f"),
            num(row.mean("train_seconds"), ".1f"),
            ref,
            delta,
        ]
    )


def flat_table(rows: list[Row], runs: list[RunResult]) -> list[str]:
    """Every method and grid point: n, top-1 last and best (mean ± std), top-5, NLL, ECE, training seconds per run."""
    options = grid_options(runs)
    head = ["method", *options, "n", "top-1 last (%)", "top-1 best (%)", "top-5 (%)", "NLL", "ECE", "train s/run"]
    lines = [md_line([*head, "reference", "Δ last − ref"]), md_line(["---"] * (len(head) + 2))]
    return lines + [_flat_row(row, options) for row in rows]


def _cell(row: Row | None, metric: str, seeds: int) -> str:
    """A paper table's cell: ``76.70 ± 0.21 (76.62, +0.08)``, with ``n=3`` when it has other than ``seeds`` runs."""
    if row is None or not row.runs:
        return "–"
    mean, std = mean_std([getattr(r, metric) for r in row.runs])
    text = pm(mean, std)
    if row.reference is not None:
        text += f" ({row.reference:.2f}, {mean - row.reference:+.2f})"
    return text + (f" n={row.n}" if row.n != seeds else "")


def paper_tables(rows: list[Row], seeds: int) -> list[str]:
    """Best-epoch and last-epoch test top-1 with pairs as columns and methods (and grid points) as rows, in tables of
    at most :data:`PAIRS_PER_TABLE` pairs; empty when the rows carry no pairs."""
    split = pairs_of(rows)
    if split is None:
        return []
    pairs: list[Pair] = list(dict.fromkeys(pair for pair, _ in split.values()))
    labels = list(dict.fromkeys(_label(m, rows[i]) for i, (_, m) in split.items()))
    cells = {(split[i][0], _label(split[i][1], row)): row for i, row in enumerate(rows)}
    lines: list[str] = []
    titles = {"best_top1": "Best-epoch test top-1 (%)", "last_top1": "Last-epoch test top-1 (%)"}
    for metric, title in titles.items():
        lines += [f"## {title}: mean ± std over seeds (published, Δ = mean − published)", ""]
        for start in range(0, len(pairs), PAIRS_PER_TABLE):
            chunk = pairs[start : start + PAIRS_PER_TABLE]
            lines.append(md_line(["teacher<br>student", *(f"{p.teacher}<br>{p.student}" for p in chunk)]))
            lines.append(md_line([":---", *([":---:"] * len(chunk))]))
            lines += [
                md_line([label, *(_cell(cells.get((p, label)), metric, seeds) for p in chunk)]) for label in labels
            ]
            lines.append("")
    return lines


def _label(method: str, row: Row) -> str:
    """A paper table's row label: the method within its pair, and the grid point when the SPEC has a grid."""
    return method if not row.grid else f"{method} {row.point}"


def _epochs_line(rows: list[Row]) -> str:
    """``240 (kd, dkd); 480 (mlkd for 13 pairs); 960 (mlkd for resnet32x4-ShuffleV2)``, or ``240`` when all share."""
    by_epochs: dict[int, dict[str, list[str]]] = {}
    split = pairs_of(rows) or {}
    for i, row in enumerate(rows):
        pair, method = split.get(i, (None, row.method))
        by_epochs.setdefault(row.epochs, {}).setdefault(method, []).append(pair.name if pair else "")
    if len(by_epochs) == 1:
        return str(next(iter(by_epochs)))
    all_pairs = {
        m: sorted({p for e in by_epochs.values() for p in e.get(m, [])})
        for m in {m for e in by_epochs.values() for m in e}
    }
    parts = []
    for epochs, methods in sorted(by_epochs.items()):
        groups: dict[tuple[str, ...], list[str]] = {}
        for method, names in methods.items():
            names = sorted(set(names))
            groups.setdefault(() if names == all_pairs[method] else tuple(names), []).append(method)
        text = "; ".join(", ".join(ms) + _for_pairs(key) for key, ms in groups.items())
        parts.append(f"{epochs} ({text})")
    return ", ".join(parts)


def _for_pairs(pairs: tuple[str, ...]) -> str:
    if not pairs:
        return ""
    return f" for {', '.join(pairs)}" if len(pairs) <= 2 else f" for {len(pairs)} pairs"


def _shared(manifest: dict[str, Any] | None, configs: list[dict[str, Any]]) -> str:
    """The settings every run shares: the SPEC's top level, then the training recipe every config.yaml agrees on."""
    shared = {k: v for k, v in ((manifest or {}).get("shared") or {}).items() if k not in _LEFT_OUT_OF_SHARED}
    for key in RECIPE_KEYS:
        values = {repr(c.get(key)) for c in configs}
        if configs and len(values) == 1 and key not in shared and configs[0].get(key) is not None:
            shared[key] = configs[0][key]
    return ", ".join(f"{k} {_shown(v)}" for k, v in shared.items()) or "–"


def _shown(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def notes(rows: list[Row], manifest: dict[str, Any] | None, configs: list[dict[str, Any]]) -> list[str]:
    """The header: what ± is, what top-1 is measured on, the shared settings and epochs, kdcache and the caches."""
    seeds = len((manifest or {}).get("seeds") or []) or max((r.n for r in rows), default=0)
    lines = [
        f"- ± is the sample standard deviation over seeds (ddof 1; `–` for one run); n = {count(seeds, 'seed')} per "
        "row unless a cell says `n=`.",
        "- Top-1 is measured on the test split, as mdistiller and the LS repo report it: *best* is a run's highest "
        "test top-1 over its epochs, *last* its final epoch's. Δ compares kdcache's mean with the SPEC's published "
        "`reference`.",
    ]
    if rows:
        lines.append(f"- Shared settings: {_shared(manifest, configs)}. Epochs: {_epochs_line(rows)}.")
    if manifest is not None:
        spec = f"`{manifest.get('spec', 'spec.yaml')}`" + (
            f" (preset {manifest['preset']})" if manifest.get("preset") else ""
        )
        caches = ", ".join(f"`{c['name']}` (id {c['id']})" for c in manifest.get("caches") or []) or "none"
        lines.append(f"- kdcache {manifest.get('kdcache', '?')}; SPEC {spec}; caches: {caches}.")
    return [*lines, ""]


def stale_lines(names: list[str]) -> list[str]:
    """The runs in the folder that the SPEC no longer names, listed once by method and point with their seeds."""
    if not names:
        return []
    points: dict[str, list[str]] = {}
    for name in names:
        point, _, seed = name.rpartition("/")
        points.setdefault(point, []).append(seed.removeprefix("seed-"))
    listed = "; ".join(f"{p} (seed {', '.join(s)})" for p, s in points.items())
    return [
        f"Not in this SPEC, left out of every mean ({count(len(names), 'run')}; `kdcache sweep SPEC --out DIR --prune` "
        f"moves them to DIR/pruned/): {listed}.",
        "",
    ]
