"""Replayable augmented views.

A view of sample ``i`` is a pure function of (cache seed, view index ``v``,
sample ``i``, view kind): its random parameters come from a Philox
counter-based generator keyed by ``(seed, kind)`` with counter ``(v, i)``, never
from global RNG state, worker ids, batch size or iteration order. The sampled
parameters are a float32 vector that the store keeps next to the logits;
:meth:`Recipe.apply` rebuilds the view's uint8 pixels from that vector alone,
and :func:`pixel_hash` fingerprints them so stage two can prove it sees the
teacher's pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from kdcache.errors import KdcacheError

RECIPES = ("none", "cifar", "imagenet", "mlkd")
KINDS = ("weak", "strong")
CIFAR_ALL_VIEWS = 9 * 9 * 2
CUTOUT_FILL = (125, 123, 114)
RANDAUGMENT_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
    "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
)


def view_rng(seed: int, view: int, sample: int, kind: int = 0) -> np.random.Generator:
    """The counter-based generator of one (seed, view, sample, kind): Philox, key (seed, kind), counter (view, sample)."""
    bits = np.random.Philox(counter=[0, 0, view, sample], key=[seed, kind])
    return np.random.Generator(bits)


def pixel_hash(pixels: torch.Tensor) -> int:
    """64-bit blake2b of a uint8 CHW view (shape included), as a Python int that fits uint64."""
    arr = np.ascontiguousarray(pixels.numpy())
    h = hashlib.blake2b(np.asarray(arr.shape, dtype=np.int64).tobytes(), digest_size=8)
    h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "little")


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


def _sample_rrc(rng: np.random.Generator, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampler, drawing from ``rng``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _randaugment_op(img: torch.Tensor, op: int, m: float) -> torch.Tensor:
    """One FixMatch-pool RandAugment op at signed magnitude ``m`` in [-1, 1] on a uint8 CHW image."""
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


@dataclass(frozen=True)
class Recipe:
    """An augmentation recipe: how to sample a view's parameters and rebuild its pixels.

    ``small`` recipes work on 32x32 images (CIFAR-style RandomCrop with zero
    padding); large ones on ImageNet-size images (RandomResizedCrop to
    ``size``, evaluation view resize 256 + center crop 224).
    """

    name: str
    small: bool
    size: int = 32
    padding: int = 4
    eval_resize: int = 256
    fields_weak: tuple[str, ...] = field(default=())
    fields_strong: tuple[str, ...] = field(default=())

    @property
    def kinds(self) -> tuple[str, ...]:
        """View kinds stored per view index: ``("weak",)``, or ``("weak", "strong")`` for MLKD."""
        return KINDS if self.name == "mlkd" else KINDS[:1]

    @property
    def num_discrete_views(self) -> int | None:
        """Size of the view space when it is finite (162 for CIFAR crop+flip, 1 for none), else None."""
        if self.name == "none":
            return 1
        if self.name == "cifar" and self.small:
            return CIFAR_ALL_VIEWS
        return None

    def fields(self, kind: int) -> tuple[str, ...]:
        """Names of the stored parameter columns for view kind ``kind``."""
        return self.fields_strong if kind == 1 else self.fields_weak

    def to_attrs(self) -> dict[str, object]:
        """JSON description stored in the cache; :func:`recipe_from_attrs` inverts it."""
        return {
            "name": self.name, "small": self.small, "size": self.size, "padding": self.padding,
            "eval_resize": self.eval_resize, "fields": {"weak": list(self.fields_weak), "strong": list(self.fields_strong)},
            "randaugment_ops": list(RANDAUGMENT_OPS) if self.name == "mlkd" else [],
            "cutout_fill": list(CUTOUT_FILL) if self.name == "mlkd" else [],
        }

    # ---------------------------------------------------------------- sampling

    def _crop_params(self, rng: np.random.Generator, h: int, w: int) -> list[float]:
        if self.small:
            span = 2 * self.padding + 1
            return [float(rng.integers(0, span)), float(rng.integers(0, span)), float(rng.integers(0, 2))]
        top, left, ch, cw = _sample_rrc(rng, h, w)
        return [float(top), float(left), float(ch), float(cw), float(rng.integers(0, 2))]

    def params(self, seed: int, view: int, sample: int, kind: int, image_hw: tuple[int, int], all_views: bool = False) -> np.ndarray:
        """The float32 parameter vector of view ``(view, sample, kind)``; ``all_views`` enumerates the 162 CIFAR views."""
        if self.name == "none":
            return np.zeros(0, dtype=np.float32)
        if all_views:
            offset, flip = divmod(view, 2)
            top, left = divmod(offset, 2 * self.padding + 1)
            return np.asarray([top, left, flip], dtype=np.float32)
        rng = view_rng(seed, view, sample, kind)
        vec = self._crop_params(rng, *image_hw)
        if kind == 1:
            side = self.size
            ops = rng.integers(0, len(RANDAUGMENT_OPS), size=2)
            mags = rng.uniform(-1.0, 1.0, size=2)
            cut = int(rng.integers(1, side // 2 + 1))
            vec += [float(ops[0]), float(mags[0]), float(ops[1]), float(mags[1])]
            vec += [float(rng.integers(0, side)), float(rng.integers(0, side)), float(cut)]
        return np.asarray(vec, dtype=np.float32)

    # ---------------------------------------------------------------- replay

    def apply(self, image: np.ndarray, params: np.ndarray, kind: int = 0) -> torch.Tensor:
        """Rebuild the uint8 CHW view of ``image`` (HWC uint8) from its stored parameter vector."""
        p = [float(x) for x in params]
        if self.small:
            if self.name == "none":
                return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            img = torch.from_numpy(_pad_crop(image, int(p[0]), int(p[1]), self.size, self.padding, p[2] >= 0.5))
            rest = p[3:]
        else:
            img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            if self.name == "none":
                img = TF.resize(img, [self.eval_resize], antialias=True)
                return TF.center_crop(img, [self.size, self.size]).contiguous()
            img = TF.resized_crop(img, int(p[0]), int(p[1]), int(p[2]), int(p[3]), [self.size, self.size], antialias=True)
            if p[4] >= 0.5:
                img = img.flip(-1)
            rest = p[5:]
        if kind == 1:
            img = _randaugment_op(img, int(rest[0]), rest[1])
            img = _randaugment_op(img, int(rest[2]), rest[3])
            img = self._cutout(img, int(rest[4]), int(rest[5]), int(rest[6]))
        return img.contiguous()

    @staticmethod
    def _cutout(img: torch.Tensor, cy: int, cx: int, side: int) -> torch.Tensor:
        img = img.clone()
        h, w = img.shape[1:]
        y0, x0 = max(cy - side // 2, 0), max(cx - side // 2, 0)
        y1, x1 = min(cy - side // 2 + side, h), min(cx - side // 2 + side, w)
        img[:, y0:y1, x0:x1] = torch.tensor(CUTOUT_FILL, dtype=torch.uint8)[:, None, None]
        return img

    def eval_view(self, image: np.ndarray) -> torch.Tensor:
        """The evaluation view (no randomness) of ``image``."""
        return make_recipe("none", self.small).apply(image, np.zeros(0, dtype=np.float32))


def make_recipe(name: str, small: bool) -> Recipe:
    """The recipe ``name`` (one of :data:`RECIPES`) for 32x32 (``small``) or ImageNet-size images."""
    if name not in RECIPES:
        raise KdcacheError(f"unknown --augment {name!r}: choose one of {', '.join(RECIPES)}")
    size = 32 if small else 224
    crop = ("top", "left", "flip") if small else ("top", "left", "height", "width", "flip")
    strong = crop + ("op1", "mag1", "op2", "mag2", "cutout_y", "cutout_x", "cutout_size")
    if name == "none":
        return Recipe(name, small, size)
    if name == "cifar" and not small:
        raise KdcacheError("--augment cifar needs 32x32 images: use --augment imagenet for ImageNet-size data")
    if name == "imagenet" and small:
        raise KdcacheError("--augment imagenet needs ImageNet-size images: use --augment cifar for 32x32 data")
    return Recipe(name, small, size, fields_weak=crop, fields_strong=strong if name == "mlkd" else ())


def recipe_from_attrs(attrs: dict[str, object]) -> Recipe:
    """Rebuild the :class:`Recipe` a cache records."""
    return make_recipe(str(attrs["name"]), bool(attrs["small"]))


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` on the batch's device."""
    m = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - m) / s
