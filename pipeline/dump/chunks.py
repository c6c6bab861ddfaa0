"""Chunks and work units of a dump: the views they cover, the teacher rows they check, how they are written.

A chunk is one view index x :data:`~kdcache.store.cache.CHUNK` samples, the unit of
storage and resumption; a :class:`Unit` (several views of one chunk's
samples) is the unit of work. Both the single-process dump
(:mod:`kdcache.dump.loop`) and the dask workers (:mod:`kdcache.dump.cluster`) build its
views with :class:`ViewSet`, check the teacher's logits with
:func:`~kdcache.store.rows.teacher_rows` and store them with :func:`~kdcache.store.rows.write_chunk` (shared
with ``kdcache derive``); only after the data is durable does :func:`~kdcache.store.rows.mark_done` record the chunk
as complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.dataset.datasets import ImageDataset
from kdcache.store.cache import CHUNK, CacheStore
from kdcache.store.rows import disk_error, mark_done, write_chunk
from kdcache.store.rows import teacher_rows as teacher_rows  # re-exported: both dump paths encode rows through it
from kdcache.views.ops import pixel_hashes
from kdcache.views.recipes import Recipe

#: A work unit covers at most this many views of one chunk, and at most UNIT_BYTES of buffered rows.
UNIT_VIEWS, UNIT_BYTES = 16, 256 << 20


def chunk_rows(num_samples: int, c: int) -> np.ndarray:
    """The sample indices of chunk ``c`` (the last chunk may be short)."""
    return np.arange(c * CHUNK, chunk_end(num_samples, c))


def chunk_end(num_samples: int, c: int) -> int:
    """One past the last sample of chunk ``c``."""
    return min(num_samples, (c + 1) * CHUNK)


@dataclass(frozen=True)
class Unit:
    """A dump's unit of work: several views of one chunk's samples, built sample-major.

    Each image is decoded once per unit and all its views are cut from it;
    the unit's chunks (one per view) are marked done only after all are written.
    """

    chunk: int
    views: tuple[int, ...]

    def size(self, num_samples: int) -> int:
        """How many views the unit builds."""
        return (chunk_end(num_samples, self.chunk) - self.chunk * CHUNK) * len(self.views)

    def items(self, num_samples: int) -> np.ndarray:
        """``(n, 2)`` (view, sample) pairs, sample-major: every view of a sample, then the next sample."""
        rows = chunk_rows(num_samples, self.chunk)
        return np.stack(np.broadcast_arrays(np.asarray(self.views)[None, :], rows[:, None]), -1).reshape(-1, 2)


def plan_units(done: np.ndarray, row_bytes: int) -> list[Unit]:
    """Units covering every (view, chunk) not yet done: per chunk, its missing views in groups that fit the limits.

    ``done`` is the store's (views, chunks) completion record; ``row_bytes``
    what one buffered row of one view costs.
    """
    per_unit = max(1, min(UNIT_VIEWS, UNIT_BYTES // max(1, CHUNK * row_bytes)))
    units = []
    for c in range(done.shape[1]):
        todo = np.flatnonzero(~done[:, c].astype(bool)).tolist()
        units += [Unit(c, tuple(todo[j : j + per_unit])) for j in range(0, len(todo), per_unit)]
    return units


class ViewBatch(NamedTuple):
    """Views built together: (view, sample) keys, uint8 pixels (kinds, n, C, H, W), per kind parameters and hashes."""

    views: np.ndarray
    samples: np.ndarray
    pixels: torch.Tensor
    params: list[np.ndarray]
    hashes: list[np.ndarray]

    def rows(self, s: slice) -> ViewBatch:
        """The views in positions ``s``."""
        return ViewBatch(
            self.views[s], self.samples[s], self.pixels[:, s], [p[s] for p in self.params], [h[s] for h in self.hashes]
        )


class ViewSet(Dataset):
    """Batches of (view, sample) pairs: uint8 pixels, float32 parameters and pixel hashes per kind.

    Indexed by a list of item positions (the loader's batch sampler), so the
    parameters come from one vectorized generator call and 32x32 crops from
    one batched copy instead of per-view Python work. A batch is
    ``(views, samples, pixels, params, hashes)``: ``pixels`` is one uint8
    tensor of shape (kinds, n, C, H, W), the rest are numpy arrays (``params``
    and ``hashes`` one per kind). From a DataLoader worker only the pixel
    tensor travels through shared memory; each shared tensor costs a socket
    handshake with the worker, which waits on that busy worker's GIL, while
    the small arrays ride along in the pickle.
    """

    def __init__(self, dataset: ImageDataset, recipe: Recipe, seed: int, items: np.ndarray, all_views: bool):
        self.dataset, self.recipe, self.seed, self.items, self.all_views = dataset, recipe, seed, items, all_views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, ks: list[int]) -> ViewBatch:
        v, i = self.items[ks, 0], self.items[ks, 1]
        images = self._decode(i)
        hw = np.asarray([im.shape[:2] for im in images], dtype=np.int64)
        pixels, params, hashes = [], [], []
        partners = partner_images = partner_hw = None
        if self.recipe.mix != "none":
            partners = self.recipe.partners(self.seed, v, i, len(self.dataset))
            partner_images = self._decode(partners)
            partner_hw = np.asarray([im.shape[:2] for im in partner_images], dtype=np.int64)
        for kind in range(len(self.recipe.kinds)):
            p = self.recipe.params_batch(self.seed, v, i, kind, hw, self.all_views, partners, partner_hw)
            x = self.recipe.apply_batch(images, p, kind, partner_images)
            pixels.append(x)
            params.append(p)
            hashes.append(pixel_hashes(x))
        return ViewBatch(v, i, torch.stack(pixels) if len(pixels) > 1 else pixels[0][None], params, hashes)

    def _decode(self, samples: np.ndarray) -> list[np.ndarray]:
        """The images of ``samples``, each distinct one decoded once (a batch holds several views of a sample)."""
        unique, inverse = np.unique(samples, return_inverse=True)
        decoded = [self.dataset.image(int(s)) for s in unique]
        return [decoded[j] for j in inverse.ravel()]


def as_is(batch: tuple) -> tuple:
    """The DataLoader's collate for :class:`ViewSet`: its default would turn the numpy arrays back into shared
    tensors."""
    return batch


@dataclass
class ChunkRows:
    """One chunk's rows as they arrive, by view kind: teacher arrays by base name, view parameters, pixel hashes.

    Rows come in any order and in pieces (forward blocks span chunks);
    :attr:`full` says when every row of the chunk is in and it can be written.
    """

    view: int
    chunk: int
    teacher: list[dict[str, np.ndarray]]
    params: list[np.ndarray]
    hashes: list[np.ndarray]
    filled: int = 0

    @classmethod
    def empty(
        cls, view: int, chunk: int, size: int, teacher: list[dict[str, np.ndarray]], params: list[np.ndarray]
    ) -> ChunkRows:
        """Room for ``size`` rows shaped like the example rows ``teacher`` and ``params`` (one entry per kind)."""
        return cls(
            view,
            chunk,
            [{name: np.empty((size, *a.shape[1:]), a.dtype) for name, a in kind.items()} for kind in teacher],
            [np.empty((size, p.shape[1]), np.float32) for p in params],
            [np.empty(size, np.uint64) for _ in params],
        )

    def add(
        self, batch: ViewBatch, teacher: list[dict[str, np.ndarray]], sel: np.ndarray | slice = slice(None)
    ) -> None:
        """Put the views ``sel`` of ``batch`` (all of this chunk) with their encoded teacher rows in place."""
        rows = batch.samples[sel] - self.chunk * CHUNK
        for k, kind in enumerate(teacher):
            for name, a in kind.items():
                self.teacher[k][name][rows] = a[sel]
            self.params[k][rows] = batch.params[k][sel]
            self.hashes[k][rows] = batch.hashes[k][sel]
        self.filled += len(rows)

    @property
    def full(self) -> bool:
        return self.filled == len(self.hashes[0])

    def write(self, store: CacheStore) -> None:
        """Write and fsync the chunk (not yet marked done); a failed write leaves it resumable."""
        try:
            write_chunk(store, self.view, self.chunk, self.teacher, self.params, self.hashes)
        except OSError as exc:
            raise disk_error(self.view, self.chunk, exc) from None


def write_unit(store: CacheStore, chunks: list[ChunkRows]) -> None:
    """Write every chunk of a unit, and only then mark them done (each chunk is durable before its mark)."""
    for chunk in chunks:
        chunk.write(store)
    for chunk in chunks:
        try:
            mark_done(store, chunk.view, chunk.chunk)
        except OSError as exc:
            raise disk_error(chunk.view, chunk.chunk, exc) from None
