"""Replayable augmented views.

A view of sample ``i`` is a pure function of (cache seed, view index ``v``,
sample ``i``, view kind): its random parameters come from Philox4x32-10, a
counter-based generator, with key ``seed`` and counter ``(block, kind, v, i)``,
never from global RNG state, worker ids, batch size or iteration order.
Because the generator is a pure function of its counter it is evaluated for a
whole batch of views at once in numpy. The sampled parameters are a float32
vector that the store keeps next to the logits;
:meth:`Recipe.apply` rebuilds the view's uint8 pixels from that vector alone,
and :func:`pixel_hash` fingerprints them so stage two can prove it sees the
teacher's pixels.

MLKD strong views come in two versions, recorded in the cache's recipe as
``strong_version`` (absent = 1): version 1 is kdcache's first torchvision
RandAugment; version 2 (what new dumps write) is pixel-identical to the
MLKD/LS reference (FixMatch RandAugment with PIL, then Cutout), with the
parameters stored in the reference's own units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from kdcache.errors import KdcacheError
from kdcache.settings import DUMP_DEFAULTS as D
from kdcache.settings import choices
from kdcache.views.ops import (
    CUTOUT_FILL,
    RANDAUGMENT_OPS,
    RANDAUGMENT_RANGES,
    STRONG_FIELDS,
    STRONG_VERSION,
    STRONG_VERSIONS,
    _pad_crop,
    _randaugment_op,
    _sample_rrc,
    _strong_columns_v2,
    _strong_v2,
)
from kdcache.views.rng import _BLOCK_CROP, _BLOCK_MIX, _BLOCK_RRC, _BLOCK_STRONG, GENERATOR, _below, _unit, view_words

RECIPES = choices("augment")
MIXES = choices("mix")
KINDS = ("weak", "strong")
CIFAR_ALL_VIEWS = 9 * 9 * 2


@dataclass(frozen=True)
class Recipe:
    """An augmentation recipe: how to sample a view's parameters and rebuild its pixels.

    ``small`` recipes work on 32x32 images (CIFAR-style RandomCrop with zero
    padding); large ones on ImageNet-size images (RandomResizedCrop to
    ``size``, evaluation view resize 256 + center crop 224).
    ``strong_version`` is the MLKD strong-view semantics (1 or 2; 0 for
    recipes without strong views); it is part of the recipe's identity.
    """

    name: str
    small: bool
    size: int = 32
    padding: int = 4
    eval_resize: int = 256
    fields_weak: tuple[str, ...] = field(default=())
    fields_strong: tuple[str, ...] = field(default=())
    mix: str = D.mix
    mix_alpha: float = D.mix_alpha
    strong_version: int = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        """View kinds stored per view index: ``("weak",)``, or ``("weak", "strong")`` for MLKD."""
        return KINDS if self.name == "mlkd" else KINDS[:1]

    @property
    def num_discrete_views(self) -> int | None:
        """Size of the view space when it is finite (162 for CIFAR crop+flip, 1 for none), else None."""
        if self.name == "none":
            return 1
        if self.name == "cifar" and self.small and self.mix == "none":
            return CIFAR_ALL_VIEWS
        return None

    def fields(self, kind: int) -> tuple[str, ...]:
        """Names of the stored parameter columns for view kind ``kind``."""
        if kind == 1:
            return self.fields_strong
        if self.mix == "none":
            return self.fields_weak
        box = ("box_top", "box_left", "box_height", "box_width") if self.mix == "cutmix" else ()
        return (*self.fields_weak, "partner", *(f"partner_{f}" for f in self.fields_weak), "lam", *box)

    def partners(self, seed: int, views: np.ndarray, samples: np.ndarray, num_samples: int) -> np.ndarray:
        """The partner sample each view ``(views[j], samples[j])`` is mixed with: never itself, uniform over the
        rest."""
        words = view_words(seed, 0, views, samples, 1, first=_BLOCK_MIX)[:, 0]
        return (np.asarray(samples, np.int64) + 1 + _below(words, max(num_samples - 1, 1))) % max(num_samples, 1)

    def partner_of(self, params: np.ndarray) -> int | None:
        """The partner sample recorded in a stored weak-view parameter vector (None without mixing)."""
        return None if self.mix == "none" else int(params[len(self.fields_weak)])

    def mixing(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(partner, lam)`` per row of stored ``(n, fields)`` weak parameters: the label weights of a mixed view."""
        if self.mix == "none":
            return None
        nc = len(self.fields_weak)
        return params[:, nc].astype(np.int64), params[:, 2 * nc + 1].astype(np.float64)

    def to_attrs(self) -> dict[str, object]:
        """JSON description stored in the cache; :func:`recipe_from_attrs` inverts it."""
        return {
            "name": self.name,
            "generator": GENERATOR,
            "small": self.small,
            "size": self.size,
            "padding": self.padding,
            "eval_resize": self.eval_resize,
            "fields": {"weak": list(self.fields_weak), "strong": list(self.fields_strong)},
            "randaugment_ops": list(RANDAUGMENT_OPS) if self.name == "mlkd" else [],
            "cutout_fill": list(CUTOUT_FILL) if self.name == "mlkd" else [],
            **({"mix": self.mix, "mix_alpha": self.mix_alpha} if self.mix != "none" else {}),
            **self._strong_attrs(),
        }

    def _strong_attrs(self) -> dict[str, object]:
        """Version 2+ MLKD recipes record their strong-view version and op ranges; version 1 caches predate both."""
        if self.name != "mlkd" or self.strong_version < 2:
            return {}
        return {"strong_version": self.strong_version, "randaugment_ranges": [list(r) for r in RANDAUGMENT_RANGES]}

    # ---------------------------------------------------------------- sampling

    def params(
        self, seed: int, view: int, sample: int, kind: int, image_hw: tuple[int, int], all_views: bool = False
    ) -> np.ndarray:
        """The float32 parameter vector of view ``(view, sample, kind)``; ``all_views`` enumerates the 162 CIFAR
        views."""
        return self.params_batch(
            seed, np.asarray([view]), np.asarray([sample]), kind, np.asarray([image_hw]), all_views
        )[0]

    def params_batch(
        self,
        seed: int,
        views: np.ndarray,
        samples: np.ndarray,
        kind: int,
        image_hw: np.ndarray,
        all_views: bool = False,
        partners: np.ndarray | None = None,
        partner_hw: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(n, fields)`` float32 parameters of views ``(views[j], samples[j])`` of kind ``kind``; ``image_hw`` is
        ``(n, 2)``.

        A mixing recipe also needs the :meth:`partners` and their image sizes:
        the partner enters with its own view of the same index, and the vector
        records partner, its crop, λ and (CutMix) the pasted box.
        """
        base = self._crop_params(seed, views, samples, kind, image_hw, all_views)
        if self.mix == "none" or kind == 1:
            return base
        if partners is None or partner_hw is None:
            raise ValueError(f"recipe {self.name} with {self.mix} needs partners and their image sizes")
        other = self._crop_params(seed, views, partners, kind, partner_hw, False)
        words = view_words(seed, 0, views, samples, 1, first=_BLOCK_MIX)[:, 1:]
        from scipy.special import betaincinv

        lam = betaincinv(self.mix_alpha, self.mix_alpha, _unit(words[:, 0]))
        cols = [base, np.asarray(partners, np.float64)[:, None], other]
        if self.mix == "mixup":
            return np.concatenate(cols + [lam[:, None]], axis=1).astype(np.float32)
        # CutMix (timm's rand_bbox): a box of side sqrt(1 - λ) around a uniform centre, clipped; λ is then the kept
        # area.
        side = self.size
        cut = (side * np.sqrt(1.0 - lam)).astype(np.int64)
        cy, cx = _below(words[:, 1], side), _below(words[:, 2], side)
        y0, y1 = np.clip(cy - cut // 2, 0, side), np.clip(cy + cut // 2, 0, side)
        x0, x1 = np.clip(cx - cut // 2, 0, side), np.clip(cx + cut // 2, 0, side)
        kept = 1.0 - (y1 - y0) * (x1 - x0) / float(side * side)
        box = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)
        return np.concatenate(cols + [kept[:, None], box], axis=1).astype(np.float32)

    def _crop_params(
        self, seed: int, views: np.ndarray, samples: np.ndarray, kind: int, image_hw: np.ndarray, all_views: bool
    ) -> np.ndarray:
        views, samples = np.asarray(views, np.int64), np.asarray(samples, np.int64)
        n = len(views)
        if self.name == "none":
            return np.zeros((n, 0), dtype=np.float32)
        if all_views:
            offset, flip = np.divmod(views, 2)
            top, left = np.divmod(offset, 2 * self.padding + 1)
            return np.stack([top, left, flip], axis=1).astype(np.float32)
        words = view_words(seed, kind, views, samples, _BLOCK_STRONG + 2)
        if self.small:
            crop = words[:, 4 * _BLOCK_CROP : 4 * _BLOCK_CROP + 3]
            cols = [
                _below(crop[:, 0], 2 * self.padding + 1),
                _below(crop[:, 1], 2 * self.padding + 1),
                crop[:, 2] >> 31,
            ]
        else:
            box = _sample_rrc(words[:, 4 * _BLOCK_RRC :], np.asarray(image_hw, np.int64).reshape(n, 2))
            cols = [box[:, 0], box[:, 1], box[:, 2], box[:, 3], words[:, 4 * _BLOCK_CROP] >> 31]
        if kind == 1 and self.strong_version >= 2:
            cols += _strong_columns_v2(words[:, 4 * _BLOCK_STRONG :], self.size)
        elif kind == 1:
            s = words[:, 4 * _BLOCK_STRONG :]
            side = self.size
            cols += [
                _below(s[:, 0], len(RANDAUGMENT_OPS)),
                2.0 * _unit(s[:, 1]) - 1.0,
                _below(s[:, 2], len(RANDAUGMENT_OPS)),
                2.0 * _unit(s[:, 3]) - 1.0,
                _below(s[:, 4], side),
                _below(s[:, 5], side),
                1 + _below(s[:, 6], side // 2),
            ]
        return np.stack([np.asarray(c, np.float64) for c in cols], axis=1).astype(np.float32)

    # ---------------------------------------------------------------- replay

    def apply(
        self, image: np.ndarray, params: np.ndarray, kind: int = 0, partner: np.ndarray | None = None
    ) -> torch.Tensor:
        """Rebuild the uint8 CHW view of ``image`` (HWC uint8) from its stored parameter vector.

        A mixed view also needs the ``partner`` image (sample :meth:`partner_of`):
        mixup blends the two views and rounds to uint8; CutMix pastes the box.
        """
        if self.mix == "none" or kind == 1:
            return self._view(image, params, kind)
        if partner is None:
            raise ValueError(f"a {self.mix} view needs its partner image")
        nc = len(self.fields_weak)
        a, b = self._view(image, params[:nc], 0), self._view(partner, params[nc + 1 : 2 * nc + 1], 0)
        if self.mix == "mixup":
            lam = float(params[2 * nc + 1])
            return (lam * a.float() + (1.0 - lam) * b.float()).round_().clamp_(0, 255).to(torch.uint8)
        y0, x0, h, w = (int(x) for x in params[2 * nc + 2 : 2 * nc + 6])
        out = a.clone()
        out[:, y0 : y0 + h, x0 : x0 + w] = b[:, y0 : y0 + h, x0 : x0 + w]
        return out

    def _view(self, image: np.ndarray, params: np.ndarray, kind: int) -> torch.Tensor:
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
            img = TF.resized_crop(
                img, int(p[0]), int(p[1]), int(p[2]), int(p[3]), [self.size, self.size], antialias=True
            )
            if p[4] >= 0.5:
                img = img.flip(-1)
            rest = p[5:]
        if kind == 1 and self.strong_version >= 2:
            img = _strong_v2(img, rest)
        elif kind == 1:
            img = _randaugment_op(img, int(rest[0]), rest[1])
            img = _randaugment_op(img, int(rest[2]), rest[3])
            img = self._cutout(img, int(rest[4]), int(rest[5]), int(rest[6]))
        return img.contiguous()

    def apply_batch(
        self, images: list[np.ndarray], params: np.ndarray, kind: int = 0, partners: list[np.ndarray] | None = None
    ) -> torch.Tensor:
        """uint8 NCHW views of ``images`` (HWC uint8) from their ``(n, fields)`` parameters; same pixels as
        :meth:`apply`.

        Weak views of 32x32 recipes take a fast path (one slice copy per view, flipped by
        writing through a mirrored view, and one transpose per batch); everything else loops :meth:`apply`.
        """
        if self.mix != "none" and kind == 0:
            unmixed: list[np.ndarray | None] = [None] * len(images)
            return torch.stack(
                [self.apply(im, p, kind, q) for im, p, q in zip(images, params, partners or unmixed, strict=True)]
            )
        if not (
            self.small
            and kind == 0
            and self.name != "none"
            and all(im.shape[:2] == (self.size, self.size) for im in images)
        ):
            return torch.stack([self.apply(im, p, kind) for im, p in zip(images, params, strict=True)])
        n, s, pad = len(images), self.size, self.padding
        out = np.zeros((n, s, s, images[0].shape[2] if n else 3), dtype=np.uint8)
        offs = params[:, :2].astype(np.int64) - pad
        for j, (im, (y0, x0), flip) in enumerate(
            zip(images, offs.tolist(), (params[:, 2] >= 0.5).tolist(), strict=True)
        ):
            dst = out[j, :, ::-1] if flip else out[j]
            dst[max(-y0, 0) : s - max(y0, 0), max(-x0, 0) : s - max(x0, 0)] = im[
                max(y0, 0) : s + min(y0, 0), max(x0, 0) : s + min(x0, 0)
            ]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))

    @staticmethod
    def _cutout(img: torch.Tensor, cy: int, cx: int, side: int) -> torch.Tensor:
        """Strong-view version 1 Cutout: a ``side`` box from ``c - side // 2``, clipped on every edge."""
        img = img.clone()
        h, w = img.shape[1:]
        y0, x0 = max(cy - side // 2, 0), max(cx - side // 2, 0)
        y1, x1 = min(cy - side // 2 + side, h), min(cx - side // 2 + side, w)
        img[:, y0:y1, x0:x1] = torch.tensor(CUTOUT_FILL, dtype=torch.uint8)[:, None, None]
        return img

    def eval_view(self, image: np.ndarray) -> torch.Tensor:
        """The evaluation view (no randomness) of ``image``."""
        return make_recipe("none", self.small).apply(image, np.zeros(0, dtype=np.float32))


def make_recipe(
    name: str, small: bool, mix: str = D.mix, mix_alpha: float = D.mix_alpha, strong_version: int = STRONG_VERSION
) -> Recipe:
    """The recipe ``name`` (one of :data:`RECIPES`) for 32x32 (``small``) or ImageNet-size images, optionally mixed.

    ``strong_version`` picks the MLKD strong-view semantics (new dumps get
    :data:`STRONG_VERSION`; old caches rebuild theirs); other recipes ignore it.
    """
    if name not in RECIPES:
        raise KdcacheError(f"unknown --augment {name!r}: choose one of {', '.join(RECIPES)}")
    if mix not in MIXES:
        raise KdcacheError(f"unknown --mix {mix!r}: choose one of {', '.join(MIXES)}")
    if mix != "none" and name not in ("cifar", "imagenet"):
        raise KdcacheError(f"--mix {mix} works with --augment cifar or imagenet, not {name}")
    if mix != "none" and not mix_alpha > 0:
        raise KdcacheError(f"--mix-alpha must be positive, got {mix_alpha}")
    if name == "mlkd" and strong_version not in STRONG_VERSIONS:
        raise _unknown_version(strong_version)
    size = 32 if small else 224
    crop = ("top", "left", "flip") if small else ("top", "left", "height", "width", "flip")
    if name == "none":
        return Recipe(name, small, size)
    if name == "cifar" and not small:
        raise KdcacheError("--augment cifar needs 32x32 images: use --augment imagenet for ImageNet-size data")
    if name == "imagenet" and small:
        raise KdcacheError("--augment imagenet needs ImageNet-size images: use --augment cifar for 32x32 data")
    mlkd = name == "mlkd"
    return Recipe(
        name,
        small,
        size,
        fields_weak=crop,
        fields_strong=crop + STRONG_FIELDS[strong_version] if mlkd else (),
        mix=mix,
        mix_alpha=float(mix_alpha),
        strong_version=int(strong_version) if mlkd else 0,
    )


def _unknown_version(version: object) -> KdcacheError:
    return KdcacheError(
        f"MLKD strong-view version {version!r} is unknown to this kdcache (it replays versions "
        f"{', '.join(map(str, STRONG_VERSIONS))}): upgrade kdcache to use this cache"
    )


def _stored_version(attrs: Mapping[str, object]) -> int:
    """The strong-view version a cache's MLKD recipe attributes record (absent = 1, before version 2 existed)."""
    version = attrs.get("strong_version", 1)
    if not isinstance(version, int):
        raise _unknown_version(version)
    return version


def recipe_from_attrs(attrs: Mapping[str, object]) -> Recipe:
    """Rebuild the :class:`Recipe` a cache records, at the strong-view version it was made with (absent = 1)."""
    name = str(attrs["name"])
    version = _stored_version(attrs) if name == "mlkd" else STRONG_VERSION
    mix_alpha = attrs.get("mix_alpha", 1.0)
    if not isinstance(mix_alpha, int | float):
        raise KdcacheError(
            f"the cache's mix_alpha {mix_alpha!r} is not a number: the cache's recipe attributes are inconsistent"
        )
    recipe = make_recipe(name, bool(attrs["small"]), str(attrs.get("mix", "none")), float(mix_alpha), version)
    fields = attrs.get("fields")
    stored = fields.get("strong") if isinstance(fields, Mapping) else None
    if stored is not None and (not isinstance(stored, list) or stored != list(recipe.fields_strong)):
        raise KdcacheError(
            f"the cache's strong-view fields {stored!r} do not match MLKD strong-view version {version}'s "
            f"{list(recipe.fields_strong)}: the cache's recipe attributes are inconsistent"
        )
    return recipe


def resumed_recipe(recipe: Recipe, stored: Mapping[str, object]) -> Recipe:
    """The recipe a dump resuming or extending a store must use: ``recipe`` at the store's strong-view version.

    A store made before version 2 keeps its version-1 semantics, so its old
    and new views stay consistent and its identity still matches.
    """
    if recipe.name != "mlkd" or stored.get("name") != "mlkd":
        return recipe
    return make_recipe(recipe.name, recipe.small, recipe.mix, recipe.mix_alpha, _stored_version(stored))


def normalize(
    batch: torch.Tensor, mean: tuple[float, ...] | torch.Tensor, std: tuple[float, ...] | torch.Tensor
) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` on the batch's device (``mean``/``std`` may already live
    there)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - m) / s


def parse_views(views: str | int, recipe: Recipe) -> tuple[int, str]:
    """``--views`` as (number of views, mode): ``all`` enumerates a finite view space, ``N`` seeds N views."""
    if str(views) == "all":
        n = recipe.num_discrete_views
        if n is None:
            what = f"recipe {recipe.name!r}" + (f" with --mix {recipe.mix}" if recipe.mix != "none" else "")
            raise KdcacheError(f"--views all needs a finite view space; {what} is continuous: pass --views N")
        return n, "all" if recipe.name == "cifar" else "seeded"
    try:
        n = int(views)
    except ValueError:
        raise KdcacheError(f"--views must be a positive integer or 'all', got {views!r}") from None
    if n < 1:
        raise KdcacheError(f"--views must be at least 1, got {n}")
    if recipe.name == "none" and n != 1:
        raise KdcacheError("--augment none has exactly one view: pass --views 1")
    return n, "seeded"
