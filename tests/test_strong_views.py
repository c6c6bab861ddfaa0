"""MLKD strong views, version 2, against an independent numpy model of the MLKD/LS reference (RandAugment in PIL).

The oracle below re-derives every op from Pillow's arithmetic (16.16 fixed-point
nearest affine, the integer RGB->L luma, float32 blends truncated to uint8, the
LUT autocontrast and equalize, the rounded 3x3 SMOOTH kernel, ImageDraw's
inclusive truncated rectangle) without calling PIL, and is compared with what
:meth:`Recipe.apply` builds. Version 1 caches must keep replaying their pixels.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError
from kdcache.store.cache import create_store, identity_mismatch
from kdcache.store.inspection import inspect_cache
from kdcache.views.ops import CUTOUT_FILL, RANDAUGMENT_OPS, RANDAUGMENT_RANGES, STRONG_VERSION, pixel_hash, pixel_hashes
from kdcache.views.recipes import make_recipe, recipe_from_attrs, resumed_recipe

OPS = {name: j for j, name in enumerate(RANDAUGMENT_OPS)}
IDENTITY = OPS["Identity"]
# The recipe attributes an MLKD cache written before strong-view version 2 holds (no "strong_version" key).
V1_ATTRS = {
    "name": "mlkd",
    "generator": "philox4x32-10 key=seed counter=(block,kind,view,sample)",
    "small": True,
    "size": 32,
    "padding": 4,
    "eval_resize": 256,
    "fields": {
        "weak": ["top", "left", "flip"],
        "strong": ["top", "left", "flip", "op1", "mag1", "op2", "mag2", "cutout_y", "cutout_x", "cutout_size"],
    },
    "randaugment_ops": list(RANDAUGMENT_OPS),
    "cutout_fill": [125, 123, 114],
}
# Digests of 200 views (seed 5) computed by the version-1 code before version 2 existed: weak pixels, strong
# pixels, strong parameters.
V1_WEAK_PIXELS, V1_STRONG_PIXELS, V1_STRONG_PARAMS = "87b8c7a216880210", "ed007d1c48fdb44b", "86806ee6b31909bc"


# ---------------------------------------------------------------- the reference, in numpy


def _luma(im: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L: ITU-R 601 weights in 16.16 fixed point, rounded."""
    r, g, b = (im[..., c].astype(np.int64) for c in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def _blend(degenerate: np.ndarray, im: np.ndarray, f: float) -> np.ndarray:
    """Image.blend for 0 <= f <= 1: ``degenerate + f * (im - degenerate)`` in C float, truncated."""
    d, a = degenerate.astype(np.float32), np.float32(f)
    return (d + a * (im.astype(np.float32) - d)).astype(np.uint8)


def _autocontrast(im: np.ndarray) -> np.ndarray:
    out = im.copy()
    for c in range(im.shape[2]):
        lo, hi = int(im[..., c].min()), int(im[..., c].max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            lut = np.clip(np.trunc(np.arange(256) * scale + -lo * scale), 0, 255).astype(np.uint8)
            out[..., c] = lut[im[..., c]]
    return out


def _equalize(im: np.ndarray) -> np.ndarray:
    out = im.copy()
    for c in range(im.shape[2]):
        hist = np.bincount(im[..., c].ravel(), minlength=256)
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if step:
            before = np.concatenate([[0], np.cumsum(hist)[:-1]])
            out[..., c] = np.minimum((step // 2 + before) // step, 255).astype(np.uint8)[im[..., c]]
    return out


def _smooth(im: np.ndarray) -> np.ndarray:
    """ImageFilter.SMOOTH: kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded to nearest; border pixels kept."""
    x, (h, w) = im.astype(np.int64), im.shape[:2]
    s = sum(x[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = im.copy()
    out[1:-1, 1:-1] = (2 * (s + 4 * x[1:-1, 1:-1]) + 13) // 26
    return out


def _scale_coords(start: float, step: float, n: int) -> np.ndarray:
    """Pillow's scale-only nearest path: a double accumulated per pixel, negative -> -1, else truncated."""
    out, v = [], start
    for _ in range(n):
        out.append(-1 if v < 0 else int(v))
        v += step
    return np.asarray(out)


def _affine(im: np.ndarray, a: tuple[float, ...]) -> np.ndarray:
    """Image.transform(AFFINE, a, NEAREST): output (x, y) samples input a·(x + ½, y + ½, 1); outside is black."""
    h, w = im.shape[:2]
    if a[1] == 0 and a[3] == 0:
        sx = np.broadcast_to(_scale_coords(a[2] + a[0] * 0.5, a[0], w)[None, :], (h, w))
        sy = np.broadcast_to(_scale_coords(a[5] + a[4] * 0.5, a[4], h)[:, None], (h, w))
    else:

        def fix(v: float) -> int:
            return math.floor(v * 65536.0 + 0.5)

        y, x = np.mgrid[0:h, 0:w].astype(np.int64)
        x0, y0 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
        sx = (x0 + y * fix(a[1]) + x * fix(a[0])) >> 16
        sy = (y0 + y * fix(a[4]) + x * fix(a[3])) >> 16
    ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.zeros_like(im)
    out[ok] = im[sy[ok], sx[ok]]
    return out


def _rotate(im: np.ndarray, angle: float) -> np.ndarray:
    """Image.rotate(angle): counter-clockwise about (w/2, h/2), matrix entries rounded to 15 decimals."""
    angle = angle % 360.0
    if angle == 0:
        return im.copy()
    h, w = im.shape[:2]
    t = -math.radians(angle)
    c, s, ns = round(math.cos(t), 15), round(math.sin(t), 15), round(-math.sin(t), 15)
    cx, cy = w / 2, h / 2
    return _affine(im, (c, s, c * -cx + s * -cy + cx, ns, c, ns * -cx + c * -cy + cy))


def _op(im: np.ndarray, name: str, v: float) -> np.ndarray:
    h, w = im.shape[:2]
    grey = np.repeat(_luma(im)[..., None], 3, axis=2)
    if name == "AutoContrast":
        return _autocontrast(im)
    if name == "Brightness":
        return _blend(np.zeros_like(im), im, v)
    if name == "Color":
        return _blend(grey, im, v)
    if name == "Contrast":
        return _blend(np.full_like(im, int(grey[..., 0].mean(dtype=np.float64) + 0.5)), im, v)
    if name == "Equalize":
        return _equalize(im)
    if name == "Identity":
        return im
    if name == "Posterize":
        return im & np.uint8(~(2 ** (8 - max(1, int(v))) - 1) & 0xFF)
    if name == "Rotate":
        return _rotate(im, v)
    if name == "Sharpness":
        return _blend(_smooth(im), im, v)
    if name == "Solarize":
        return np.where(im < v, im, 255 - im).astype(np.uint8)
    return _affine(
        im,
        {
            "ShearX": (1, v, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, v, 1, 0),
            "TranslateX": (1, 0, v * w, 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, v * h),
        }[name],
    )


def _cutout(im: np.ndarray, frac: float, cx: float, cy: float) -> np.ndarray:
    """The reference Cutout: top-left int(max(0, c - side/2)), bottom-right truncated, inclusive, clipped."""
    if frac <= 0:
        return im
    h, w = im.shape[:2]
    side = frac * w
    x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
    out = im.copy()
    out[y0 : min(y1, h - 1) + 1, x0 : min(x1, w - 1) + 1] = CUTOUT_FILL
    return out


def _oracle_view(im: np.ndarray, p: np.ndarray) -> np.ndarray:
    """RandomCrop(32, padding=4) + flip + RandAugment(2) + Cutout of an HWC image from a stored version-2 vector."""
    top, left, flip, op1, val1, op2, val2, frac, cx, cy = (float(x) for x in p)
    out = np.pad(im, ((4, 4), (4, 4), (0, 0)))[int(top) : int(top) + 32, int(left) : int(left) + 32]
    if flip >= 0.5:
        out = out[:, ::-1]
    out = _op(np.ascontiguousarray(out), RANDAUGMENT_OPS[int(op1)], val1)
    out = _op(out, RANDAUGMENT_OPS[int(op2)], val2)
    return _cutout(out, frac, cx, cy).transpose(2, 0, 1)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Real 32x32 images: colour patches of scikit-learn's two sample photos, and handwritten digits."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    patches = []
    for k in range(120):
        ph = photos[k % 2]
        y, x = rng.integers(0, ph.shape[0] - 32), rng.integers(0, ph.shape[1] - 32)
        patches.append(np.ascontiguousarray(ph[y : y + 32, x : x + 32]))
    digits = build_dataset("digits", None, "train")
    return patches + [digits.image(int(i)) for i in rng.integers(0, len(digits), 60)]


def _one_op(op: int, v: float, frac: float = 0.0, cx: float = 16.0, cy: float = 16.0) -> np.ndarray:
    """A version-2 strong vector whose crop is the image itself and whose second op is Identity."""
    return np.asarray([4, 4, 0, op, v, IDENTITY, 0.5, frac, cx, cy], np.float32)


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=8).hexdigest()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_op_equals_the_reference(images, name):
    r, op = make_recipe("mlkd", True), OPS[name]
    lo, hi = RANDAUGMENT_RANGES[op]
    rng = np.random.default_rng(op)
    values = [lo, float(np.nextafter(np.float32(hi), np.float32(lo)))] + list(rng.uniform(lo, hi, len(images) - 2))
    bad = []
    for k, (im, v) in enumerate(zip(images, values, strict=True)):
        p = _one_op(op, v)
        if not np.array_equal(r.apply(im, p, 1).numpy(), _op(im, name, float(p[4])).transpose(2, 0, 1)):
            bad.append((k, float(p[4])))
    assert not bad, f"{name}: {len(bad)} of {len(images)} images differ, first {bad[:3]}"


def test_cutout_equals_the_reference(images):
    r, rng = make_recipe("mlkd", True), np.random.default_rng(1)
    cases = [(0.0, 16, 16), (1e-6, 1.0001, 32.0), (0.4999, 1.0001, 1.0001), (0.4999, 32.0, 32.0), (0.5 / 32, 31.9, 0.5)]
    cases += [(0.5 * rng.random(), 32 - 31 * rng.random(), 32 - 31 * rng.random()) for _ in range(len(images) - 5)]
    for im, (frac, cx, cy) in zip(images, cases, strict=True):
        p = _one_op(IDENTITY, 0.5, frac, cx, cy)
        assert np.array_equal(r.apply(im, p, 1).numpy(), _cutout(im, *map(float, p[7:])).transpose(2, 0, 1))


def test_cutout_box_by_hand():
    r, im = make_recipe("mlkd", True), np.zeros((32, 32, 3), np.uint8)

    def box(frac: float, cx: float, cy: float) -> tuple[list[int], list[int]]:
        filled = (r.apply(im, _one_op(IDENTITY, 0.5, frac, cx, cy), 1).numpy() != 0).any(axis=0)
        return np.flatnonzero(filled.any(axis=0)).tolist(), np.flatnonzero(filled.any(axis=1)).tolist()

    assert box(0.25, 16.0, 16.0) == (list(range(12, 21)), list(range(12, 21)))  # side 8: 9 px, inclusive
    assert box(0.375, 2.0, 30.0) == (list(range(0, 13)), list(range(24, 32)))  # left edge shifts, bottom clips
    assert box(0.25, 16.7, 3.9) == (list(range(12, 21)), list(range(0, 9)))  # float corners truncate
    view = r.apply(im, _one_op(IDENTITY, 0.5, 0.25, 16.0, 16.0), 1).numpy()
    assert view[:, 16, 16].tolist() == list(CUTOUT_FILL)


def test_whole_strong_views_equal_the_reference(images):
    r = make_recipe("mlkd", True)
    n = 300
    views, samples = np.arange(n) % 6, (np.arange(n) * 7) % len(images)
    params = r.params_batch(11, views, samples, 1, np.full((n, 2), 32))
    batch = r.apply_batch([images[int(i)] for i in samples], params, 1).numpy()
    same = [np.array_equal(batch[j], _oracle_view(images[int(i)], params[j])) for j, i in enumerate(samples)]
    assert sum(same) == n, f"{n - sum(same)} of {n} strong views differ from the reference"
    assert set(params[:, 3].astype(int)) | set(params[:, 5].astype(int)) == set(range(len(RANDAUGMENT_OPS)))


def test_sampling_follows_the_reference_distributions():
    r, n = make_recipe("mlkd", True), 60000
    p = r.params_batch(3, np.arange(n) % 50, np.arange(n) // 50, 1, np.full((n, 2), 32)).astype(np.float64)
    ops, vals = np.concatenate([p[:, 3], p[:, 5]]).astype(int), np.concatenate([p[:, 4], p[:, 6]])
    counts = np.bincount(ops, minlength=14)
    assert np.abs(counts - 2 * n / 14).max() < 5 * math.sqrt(2 * n / 14)  # uniform
    assert abs((p[:, 3] == p[:, 5]).mean() - 1 / 14) < 0.005  # with replacement
    for op, (lo, hi) in enumerate(RANDAUGMENT_RANGES):
        v = vals[ops == op]
        assert lo <= v.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < v.max() < hi
        assert abs(v.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
    assert set(np.floor(vals[ops == OPS["Posterize"]]).astype(int)) == {4, 5, 6, 7}
    assert set(np.ceil(vals[ops == OPS["Solarize"]]).astype(int)) == set(range(1, 257))
    frac, centres = p[:, 7], p[:, 8:10]
    assert frac.min() >= 0 and frac.max() < 0.5 and abs(frac.mean() - 0.25) < 0.005
    assert np.bincount((32 * frac).astype(int) + 1, minlength=17)[1:].min() > n / 16 * 0.9  # side 1..16 uniform
    assert 1 < centres.min() < 1.01 and 31.99 < centres.max() <= 32 and abs(centres.mean() - 16.5) < 0.1


def test_large_mlkd_strong_views_replay():
    r = make_recipe("mlkd", False)
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    p = r.params(0, 2, 5, 1, (300, 400))
    assert len(p) == len(r.fields(1)) == 12 and 1 < p[10] <= 224 and 1 < p[11] <= 224
    assert tuple(r.apply(img, p, 1).shape) == (3, 224, 224)
    assert pixel_hash(r.apply(img, p, 1)) == pixel_hash(r.apply(img, p.copy(), 1))


def test_version_one_caches_replay_their_pixels():
    ds = build_dataset("digits", None, "train")
    r1 = recipe_from_attrs(V1_ATTRS)
    assert r1.strong_version == 1 and r1.to_attrs() == V1_ATTRS and r1 != make_recipe("mlkd", True)
    n = 200
    views, samples = np.arange(n) % 7, (np.arange(n) * 13) % len(ds)
    imgs = [ds.image(int(i)) for i in samples]
    digests = []
    for r in (r1, make_recipe("mlkd", True)):
        for kind in (0, 1):
            p = r.params_batch(5, views, samples, kind, np.full((n, 2), 32))
            digests.append((_digest(pixel_hashes(r.apply_batch(imgs, p, kind))), _digest(p)))
    assert digests[0][0] == V1_WEAK_PIXELS and digests[1] == (V1_STRONG_PIXELS, V1_STRONG_PARAMS)
    assert digests[2] == digests[0]  # weak views did not change
    assert digests[3][0] != V1_STRONG_PIXELS


def test_version_one_and_two_differ_where_the_reference_differs():
    r1, r2 = recipe_from_attrs(V1_ATTRS), make_recipe("mlkd", True)
    im = np.full((32, 32, 3), 200, np.uint8)
    rotated1 = r1.apply(im, np.asarray([4, 4, 0, OPS["Rotate"], 0.5, IDENTITY, 0, 16, 16, 1], np.float32), 1)
    rotated2 = r2.apply(im, _one_op(OPS["Rotate"], 15.0), 1)
    assert rotated1[:, 0, 0].tolist() == [128, 128, 128] and rotated2[:, 0, 0].tolist() == [0, 0, 0]
    ramp = np.repeat(np.arange(32, dtype=np.uint8)[None, :, None] * 8, 32, axis=0).repeat(3, axis=2)
    shifted = r2.apply(ramp, _one_op(OPS["TranslateX"], 0.1), 1).numpy()  # content moves left by round(3.2) = 3
    assert shifted[0, 0, :29].tolist() == (ramp[0, 3:, 0]).tolist() and shifted[0, 0, 29:].tolist() == [0, 0, 0]
    sheared = r2.apply(ramp, _one_op(OPS["ShearX"], 0.3), 1).numpy()  # about the top-left corner: row 0 stays
    assert sheared[0, 0].tolist() == ramp[0, :, 0].tolist() and sheared[0, 31, -9:].tolist() == [0] * 9


def test_recipe_identity_includes_the_version():
    v2 = make_recipe("mlkd", True).to_attrs()
    assert v2["strong_version"] == STRONG_VERSION == 2 and recipe_from_attrs(v2) == make_recipe("mlkd", True)
    assert "strong_version" not in make_recipe("cifar", True).to_attrs()
    assert recipe_from_attrs(make_recipe("cifar", True).to_attrs()) == make_recipe("cifar", True)
    assert identity_mismatch({"recipe": V1_ATTRS}, {"recipe": v2}) is not None  # a v2 dump cannot extend a v1 store
    resumed = resumed_recipe(make_recipe("mlkd", True), V1_ATTRS)
    assert (
        resumed.strong_version == 1 and identity_mismatch({"recipe": V1_ATTRS}, {"recipe": resumed.to_attrs()}) is None
    )
    with pytest.raises(KdcacheError, match="strong-view version 3 is unknown"):
        recipe_from_attrs({**v2, "strong_version": 3})
    with pytest.raises(KdcacheError, match="do not match"):
        recipe_from_attrs({**V1_ATTRS, "strong_version": 2})


@pytest.mark.parametrize("attrs, shown", [(V1_ATTRS, "mlkd (strong views v1)"), (None, "mlkd (strong views v2)")])
def test_inspect_shows_the_strong_view_version(tmp_path, attrs, shown):
    recipe = make_recipe("mlkd", True) if attrs is None else recipe_from_attrs(attrs)
    store_attrs = {
        "teacher": {"name": "t", "checkpoint_sha256": "0" * 64, "forward_block": 8, "amp": False},
        "dataset": {"name": "digits", "length": 2},
        "split": "train",
        "recipe": recipe.to_attrs(),
        "seed": 0,
        "dtype": "float32",
        "num_classes": 3,
        "views_mode": "seeded",
    }
    create_store(
        tmp_path / "c.zarr",
        num_views=1,
        labels=np.zeros(2, np.int64),
        num_classes=3,
        dtype="float32",
        kinds=2,
        param_fields=[list(recipe.fields(k)) for k in range(2)],
        attrs=store_attrs,
    )
    line = next(x for x in inspect_cache(str(tmp_path / "c.zarr")).lines() if x.startswith("recipe"))
    assert line.startswith(f"recipe     {shown}  views 1")


def test_strong_views_do_not_touch_global_rng():
    r = make_recipe("mlkd", True)
    p = r.params(0, 1, 2, 1, (32, 32))
    torch.manual_seed(0)
    np.random.seed(0)
    a = r.apply(np.full((32, 32, 3), 90, np.uint8), p, 1)
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(a, r.apply(np.full((32, 32, 3), 90, np.uint8), p, 1))


def test_extending_a_version_one_cache_keeps_its_semantics(tmp_path, teacher_ckpt, monkeypatch):
    import functools

    from kdcache.dump import loop as dump
    from kdcache.dump.loop import dump_logits
    from kdcache.store.cache import open_store
    from kdcache.store.verify import verify_cache

    kw = dict(teacher="resnet8", checkpoint=str(teacher_ckpt[10]), dataset="digits", augment="mlkd", progress=False)
    out = str(tmp_path / "v1.zarr")
    with monkeypatch.context() as m:  # a cache as kdcache made them before version 2
        m.setattr(dump, "make_recipe", functools.partial(dump.make_recipe, strong_version=1))
        dump_logits(views=1, out=out, **kw)
    before = np.asarray(open_store(out).group["view_hash_strong"][0])
    dump_logits(views=2, out=out, **kw)
    store = open_store(out)
    assert "strong_version" not in store.attrs["recipe"] and "mag1" in store.attrs["recipe"]["fields"]["strong"]
    assert np.array_equal(np.asarray(store.group["view_hash_strong"][0]), before) and store.complete()
    assert verify_cache(out, "resnet8", str(teacher_ckpt[10]), None, 20, None, "cpu").ok
