"""Pixel operations of the view recipes (crops, flips, RandAugment, Cutout) and the pixel hash."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdcache.views.rng import _below, _unit

CUTOUT_FILL = (125, 123, 114)


RANDAUGMENT_OPS = (
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Identity",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)


# The reference's (low, high) value range per op, in RANDAUGMENT_OPS order: value = low + (high - low) * U[0, 1).
RANDAUGMENT_RANGES = (
    (0.0, 1.0),
    (0.05, 0.95),
    (0.05, 0.95),
    (0.05, 0.95),
    (0.0, 1.0),
    (0.0, 1.0),
    (4.0, 8.0),
    (-30.0, 30.0),
    (0.05, 0.95),
    (-0.3, 0.3),
    (-0.3, 0.3),
    (0.0, 256.0),
    (-0.3, 0.3),
    (-0.3, 0.3),
)


STRONG_VERSION = 2  # what new MLKD dumps write


STRONG_VERSIONS = (1, 2)  # what this kdcache can replay


STRONG_FIELDS = {
    1: ("op1", "mag1", "op2", "mag2", "cutout_y", "cutout_x", "cutout_size"),
    2: ("op1", "val1", "op2", "val2", "cutout_frac", "cutout_cx", "cutout_cy"),
}


RRC_TRIALS = 10


def pixel_hash(pixels: torch.Tensor) -> int:
    """64-bit blake2b of a uint8 CHW view (shape included), as a Python int that fits uint64."""
    return int(pixel_hashes(pixels[None])[0])


def pixel_hashes(batch: torch.Tensor | np.ndarray) -> np.ndarray:
    """:func:`pixel_hash` of every view of a uint8 NCHW batch, as a uint64 array."""
    arr = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch)
    head = hashlib.blake2b(np.asarray(arr.shape[1:], dtype=np.int64).tobytes(), digest_size=8)
    out = np.empty(len(arr), np.uint64)
    for j, row in enumerate(arr):
        h = head.copy()
        h.update(row.data)
        out[j] = int.from_bytes(h.digest(), "little")
    return out


def _pad_crop(img: np.ndarray, top: int, left: int, size: int, pad: int, flip: bool) -> np.ndarray:
    """Zero-padded crop (+ horizontal flip) of an HWC uint8 image, as CHW, without materialising the padding."""
    h, w = img.shape[:2]
    out = np.zeros((size, size, img.shape[2]), dtype=np.uint8)
    y0, x0 = top - pad, left - pad
    sy, sx = max(y0, 0), max(x0, 0)
    ey, ex = min(y0 + size, h), min(x0 + size, w)
    if sy < ey and sx < ex:
        out[sy - y0 : ey - y0, sx - x0 : ex - x0] = img[sy:ey, sx:ex]
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _sample_rrc(words: np.ndarray, hw: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop box sampler (10 trials, then a centre fallback), vectorized over views.

    ``words`` holds :data:`RRC_TRIALS` pairs of uniforms (area, log aspect) and
    then the words for top and left; returns ``(n, 4)`` boxes (top, left, height, width).
    """
    h, w = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    u = _unit(words[:, : 2 * RRC_TRIALS]).reshape(-1, RRC_TRIALS, 2)
    target = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(axis=1)
    rows = np.arange(len(hw))
    ch, cw = ch[rows, first].astype(np.int64), cw[rows, first].astype(np.int64)
    hh, ww = hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)
    in_ratio = ww / hh
    fb_w = np.where(
        in_ratio < ratio[0], ww, np.where(in_ratio > ratio[1], np.round(hh * ratio[1]).astype(np.int64), ww)
    )
    fb_h = np.where(in_ratio < ratio[0], np.round(ww / ratio[0]).astype(np.int64), hh)
    found = ok.any(axis=1)
    ch, cw = np.where(found, ch, fb_h), np.where(found, cw, fb_w)
    top = np.where(found, _below(words[:, 2 * RRC_TRIALS], hh - ch + 1), (hh - ch) // 2)
    left = np.where(found, _below(words[:, 2 * RRC_TRIALS + 1], ww - cw + 1), (ww - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1)


def _randaugment_op(img: torch.Tensor, op: int, m: float) -> torch.Tensor:
    """Strong-view version 1: one FixMatch-pool op at signed magnitude ``m`` in [-1, 1] on a uint8 CHW image."""
    name = RANDAUGMENT_OPS[op]
    a = abs(m)
    factor = 0.05 + 0.9 * a
    grey = [128.0, 128.0, 128.0]
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Brightness":
        return TF.adjust_brightness(img, factor)
    if name == "Color":
        return TF.adjust_saturation(img, factor)
    if name == "Contrast":
        return TF.adjust_contrast(img, factor)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return TF.posterize(img, min(8, 4 + int(4 * a)))
    if name == "Rotate":
        return TF.rotate(img, 30.0 * m, fill=grey)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, factor)
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(0.3 * m))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=grey)
    if name == "Solarize":
        return TF.solarize(img, float(int(255 - 255 * a)))
    dx = int(round(0.3 * m * img.shape[2])) if name == "TranslateX" else 0
    dy = int(round(0.3 * m * img.shape[1])) if name == "TranslateY" else 0
    return TF.affine(img, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=grey)


def _randaugment_pil(img: Image.Image, op: int, v: float) -> Image.Image:
    """Strong-view version 2: op ``op`` at the reference's value ``v`` (its own units), as MLKD/LS apply it in PIL.

    Geometric ops sample nearest-neighbour and fill black; shears are about
    the top-left corner; a positive translation moves the content left/up.
    """
    name = RANDAUGMENT_OPS[op]
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(v)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name == "Rotate":
        return img.rotate(v)
    if name == "Solarize":
        return ImageOps.solarize(img, math.ceil(v))  # PIL takes an int level; i < v exactly when i < ceil(v)
    w, h = img.size
    matrix = {
        "ShearX": (1.0, v, 0.0, 0.0, 1.0, 0.0),
        "ShearY": (1.0, 0.0, 0.0, v, 1.0, 0.0),
        "TranslateX": (1.0, 0.0, v * w, 0.0, 1.0, 0.0),
        "TranslateY": (1.0, 0.0, 0.0, 0.0, 1.0, v * h),
    }[name]
    return img.transform(img.size, Image.Transform.AFFINE, matrix)


def _cutout_pil(img: Image.Image, frac: float, cx: float, cy: float) -> Image.Image:
    """Strong-view version 2 Cutout: a box of side ``frac * width`` near centre ``(cx, cy)``, drawn the reference's way.

    The box's top-left is ``int(max(0, c - side / 2))`` (a box at the left or
    top edge is shifted, keeping its size); ImageDraw truncates the float
    bottom-right corner and fills it inclusively, clipped at the image edge.
    """
    if frac <= 0:
        return img
    w, h = img.size
    side = frac * w
    x0, y0 = int(max(0.0, cx - side / 2.0)), int(max(0.0, cy - side / 2.0))
    out = img.copy()
    ImageDraw.Draw(out).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), fill=CUTOUT_FILL)
    return out


def _strong_v2(img: torch.Tensor, rest: list[float]) -> torch.Tensor:
    """Version 2 strong view of a uint8 CHW crop: two ops then Cutout, from ``(op1, val1, op2, val2, frac, cx, cy)``."""
    pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
    pil = _randaugment_pil(pil, int(rest[0]), rest[1])
    pil = _randaugment_pil(pil, int(rest[2]), rest[3])
    pil = _cutout_pil(pil, rest[4], rest[5], rest[6])
    return torch.from_numpy(np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)))


def _f32_below(x: np.ndarray, high: np.ndarray | float) -> np.ndarray:
    """``x`` as float32, kept strictly below ``high`` (rounding to float32 must not reach an open upper bound)."""
    return np.minimum(x.astype(np.float32), np.nextafter(np.float32(high), np.float32(-np.inf)))


def _strong_columns_v2(s: np.ndarray, side: int) -> list[np.ndarray]:
    """Version 2 strong parameters from words ``s``: the reference's draws, in its units (see :data:`STRONG_FIELDS`).

    Ops are uniform with replacement, ``value = low + (high - low) * U``; the
    Cutout fraction is ``0.5 * U`` and each centre coordinate is
    ``np.random.uniform(side)``'s ``side - (side - 1) * U``, i.e. in (1, side].
    """
    low, high = (np.asarray(r, np.float64) for r in zip(*RANDAUGMENT_RANGES, strict=True))
    cols: list[np.ndarray] = []
    for j in (0, 2):
        op = _below(s[:, j], len(RANDAUGMENT_OPS))
        cols += [op, _f32_below(low[op] + (high[op] - low[op]) * _unit(s[:, j + 1]), high[op])]
    cols.append(_f32_below(0.5 * _unit(s[:, 4]), 0.5))
    above_one = np.nextafter(np.float32(1.0), np.float32(2.0))
    cols += [np.maximum((side - (side - 1) * _unit(s[:, j])).astype(np.float32), above_one) for j in (5, 6)]
    return cols
