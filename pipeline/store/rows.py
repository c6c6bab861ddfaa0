"""A chunk's rows as the store holds them: the teacher's logits checked and encoded, written, then marked done.

One piece of code for everything that writes teacher rows: the single-process dump, the dask workers
(:mod:`kdcache.dump.chunks` re-exports these) and ``kdcache derive``, which re-encodes a cache's stored logits
with the same :func:`teacher_rows`, so a derived top-k cache equals a dumped one bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.errors import KdcacheError
from kdcache.store.cache import CHUNK, CacheStore, array_names
from kdcache.store.formats import LogitFormat, encode

FLOAT16_MAX = 65504.0


def check_logits(logits: torch.Tensor, views: np.ndarray, samples: np.ndarray, dtype: str, kind: str) -> None:
    """Refuse non-finite logits, and logits a float16 store cannot hold, naming the first bad (sample, view)."""
    a = logits.numpy()  # numpy: torch's CPU thread pool stalls behind busy loader workers
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise KdcacheError(
            f"teacher produced non-finite {kind}logits for sample {int(samples[r])}, view {int(views[r])}: check "
            "the checkpoint and --amp"
        )
    if dtype == "float16":
        over = np.abs(a).max(axis=1) > FLOAT16_MAX
        if over.any():
            r = int(np.flatnonzero(over)[0])
            raise KdcacheError(
                f"teacher {kind}logits of sample {int(samples[r])}, view {int(views[r])} exceed the float16 range "
                "(|x| > 65504): use --dtype float32"
            )


def teacher_rows(
    logits: list[torch.Tensor],
    views: np.ndarray,
    samples: np.ndarray,
    labels: torch.Tensor,
    fmt: LogitFormat,
    dtype: str,
) -> list[dict[str, np.ndarray]]:
    """Per view kind, the teacher's host logits checked (:func:`check_logits`) and encoded as the store holds them."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    out = []
    for k, x in enumerate(logits):
        check_logits(x, views, samples, dtype, "strong " if k else "")
        out.append(encode(x, labels[torch.from_numpy(samples)], fmt, np_dtype))
    return out


def write_chunk(
    store: CacheStore,
    v: int,
    c: int,
    teacher: list[dict[str, np.ndarray]],
    params: list[np.ndarray],
    hashes: list[np.ndarray],
) -> None:
    """Write chunk ``c`` of view ``v`` (per kind: teacher arrays by base name, parameters, pixel hashes) and fsync it;
    not yet marked done."""
    names = array_names(len(teacher), store.format)
    rows = slice(c * CHUNK, c * CHUNK + len(hashes[0]))
    written = []
    for k in range(len(teacher)):
        for name in names["teacher"][k]:
            store.array(name)[v, rows] = teacher[k][name.removesuffix("_strong")]
            written.append(name)
        if store.has(names["params"][k]):
            store.array(names["params"][k])[v, rows] = params[k]
            written.append(names["params"][k])
        store.array(names["view_hash"][k])[v, rows] = hashes[k]
        written.append(names["view_hash"][k])
    store.sync_chunk(written, v, c)


def mark_done(store: CacheStore, v: int, c: int) -> None:
    """Record chunk ``c`` of view ``v`` as complete, after its data is durable."""
    store.array("done")[v, c] = 1
    store.sync_chunk(["done"], v, None)


def disk_error(v: int, c: int, exc: OSError) -> KdcacheError:
    """The one-line error for a failed chunk write; the store stays resumable."""
    return KdcacheError(
        f"writing view {v}, chunk {c} failed ({exc.strerror or exc}): free space or fix the "
        "store location, then re-run the same command to resume"
    )


__all__ = ["FLOAT16_MAX", "check_logits", "teacher_rows", "write_chunk", "mark_done", "disk_error"]
