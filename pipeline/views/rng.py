"""Philox4x32-10, the counter-based generator every view's random parameters come from."""

from __future__ import annotations

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)


PHILOX_W = (0x9E3779B9, 0xBB67AE85)


_MASK32 = np.uint64(0xFFFFFFFF)


# Counter blocks (4 words each) of a view's random stream, fixed per purpose so
# adding a draw to one stage never shifts another stage's numbers.
_BLOCK_CROP, _BLOCK_RRC, _BLOCK_STRONG, _BLOCK_MIX = 0, 1, 7, 9


GENERATOR = "philox4x32-10 key=seed counter=(block,kind,view,sample)"


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC 2011) over arrays: counter ``(..., 4)`` and key ``(..., 2)`` uint32 -> ``(...,
    4)`` uint32."""
    c = [np.asarray(counter)[..., j].astype(np.uint64) for j in range(4)]
    k = [np.asarray(key)[..., j].astype(np.uint64) for j in range(2)]
    m0, m1, w0, w1 = (np.uint64(x) for x in (*PHILOX_M, *PHILOX_W))
    for rnd in range(10):
        if rnd:
            k = [(k[0] + w0) & _MASK32, (k[1] + w1) & _MASK32]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & _MASK32]
    return np.stack(c, axis=-1).astype(np.uint32)


def view_words(seed: int, kind: int, views: np.ndarray, samples: np.ndarray, blocks: int, first: int = 0) -> np.ndarray:
    """``(n, 4 * blocks)`` uint32 random words of views ``(views[j], samples[j])``: counter (block, kind, view, sample),
    key seed,
    for blocks ``first .. first + blocks - 1``."""
    views, samples = np.asarray(views, np.uint64).ravel(), np.asarray(samples, np.uint64).ravel()
    n = len(views)
    counter = np.empty((n, blocks, 4), np.uint64)
    counter[..., 0] = np.arange(first, first + blocks, dtype=np.uint64)
    counter[..., 1] = kind
    counter[..., 2] = views[:, None]
    counter[..., 3] = samples[:, None]
    key = np.asarray([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], np.uint64)
    return philox4x32_10(counter, key).reshape(n, 4 * blocks)


def _below(words: np.ndarray, bound: np.ndarray | int) -> np.ndarray:
    """Integers in ``[0, bound)`` from uint32 words by multiply-shift (bias below bound / 2**32)."""
    return ((words.astype(np.uint64) * np.asarray(bound, np.uint64)) >> np.uint64(32)).astype(np.int64)


def _unit(words: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) from uint32 words."""
    return words.astype(np.float64) / 2.0**32
