import numpy as np
import pytest
import torch

from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError
from kdcache.views.ops import pixel_hash, pixel_hashes
from kdcache.views.recipes import CIFAR_ALL_VIEWS, make_recipe
from kdcache.views.rng import philox4x32_10


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits")


def test_params_depend_only_on_seed_view_sample_kind():
    r = make_recipe("mlkd", True)
    a = [r.params(3, v, i, k, (32, 32)) for v, i, k in [(0, 1, 0), (5, 9, 1), (2, 2, 1)]]
    np.random.seed(123)  # global RNG state must not matter
    b = [r.params(3, v, i, k, (32, 32)) for v, i, k in reversed([(0, 1, 0), (5, 9, 1), (2, 2, 1)])][::-1]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(r.params(3, 0, 1, 0, (32, 32)), r.params(4, 0, 1, 0, (32, 32)))
    assert len(r.params(0, 0, 0, 1, (32, 32))) == len(r.fields(1)) == 10


def test_all_cifar_views_are_the_162_distinct_crop_flips(digits):
    r = make_recipe("cifar", True)
    params = {tuple(r.params(0, v, 7, 0, (32, 32), all_views=True)) for v in range(CIFAR_ALL_VIEWS)}
    assert params == {(t, lt, f) for t in range(9) for lt in range(9) for f in range(2)}
    hashes = {pixel_hash(r.apply(digits.image(7), np.asarray(p, np.float32))) for p in params}
    assert len(hashes) > 100  # distinct pixels (a few crops of a dark border can coincide)


def test_cifar_crop_matches_zero_padded_random_crop(digits):
    r = make_recipe("cifar", True)
    img = digits.image(3)
    view = r.apply(img, np.asarray([0, 8, 1], np.float32)).numpy()
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    assert np.array_equal(view, padded[0:32, 8:40][:, ::-1].transpose(2, 0, 1))


def test_replay_from_stored_params_gives_the_same_hash(digits):
    r = make_recipe("mlkd", True)
    for kind in (0, 1):
        p = r.params(0, 4, 11, kind, (32, 32))
        stored = p.astype(np.float32).copy()
        assert pixel_hash(r.apply(digits.image(11), p, kind)) == pixel_hash(r.apply(digits.image(11), stored, kind))


def test_strong_view_has_grey_cutout(digits):
    r = make_recipe("mlkd", True)
    p = r.params(0, 0, 0, 1, (32, 32))
    p[-3:] = [0.25, 16, 16]  # side 0.25 * 32 = 8 around (16, 16): columns and rows 12..20 inclusive
    p[3], p[5] = 5, 5  # Identity ops, so only crop, flip and cutout act
    view = r.apply(digits.image(0), p, 1).numpy()
    assert (view[:, 12:21, 12:21] == np.array([125, 123, 114])[:, None, None]).all()


def test_imagenet_recipe_sizes():
    r = make_recipe("imagenet", False)
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    p = r.params(0, 1, 2, 0, (300, 400))
    top, left, h, w, _ = p
    assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
    assert tuple(r.apply(img, p).shape) == (3, 224, 224)
    assert tuple(r.eval_view(img).shape) == (3, 224, 224)


def test_recipe_size_mismatch_is_refused():
    with pytest.raises(KdcacheError, match="--augment imagenet"):
        make_recipe("cifar", False)
    with pytest.raises(KdcacheError, match="choose one of"):
        make_recipe("autoaugment", True)


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32_10(np.asarray(counter, np.uint32), np.asarray(key, np.uint32))
    assert out.tolist() == list(expected)


@pytest.mark.parametrize("name, small", [("cifar", True), ("mlkd", True), ("imagenet", False)])
def test_batched_params_equal_one_at_a_time(name, small):
    r = make_recipe(name, small)
    views, samples = np.arange(40) % 5, np.arange(40) * 7
    hw = np.asarray([(32, 32)] * 40) if small else np.asarray([(300 + j, 400 - 3 * j) for j in range(40)])
    for kind in range(len(r.kinds)):
        batch = r.params_batch(9, views, samples, kind, hw)
        single = [r.params(9, int(v), int(i), kind, tuple(s)) for v, i, s in zip(views, samples, hw, strict=True)]
        assert np.array_equal(batch, np.stack(single))
        assert len(np.unique(batch, axis=0)) > 30


def test_batched_views_and_hashes_equal_one_at_a_time(digits):
    r = make_recipe("mlkd", True)
    samples = np.arange(CIFAR_ALL_VIEWS) % len(digits)
    images = [digits.image(int(i)) for i in samples]
    for kind, params in [
        (0, make_recipe("cifar", True).params_batch(0, np.arange(CIFAR_ALL_VIEWS), samples, 0, None, all_views=True)),
        (1, r.params_batch(0, np.zeros(20, np.int64), samples[:20], 1, np.full((20, 2), 32))),
    ]:
        batch = r.apply_batch(images[: len(params)], params, kind)
        single = [r.apply(im, p, kind) for im, p in zip(images[: len(params)], params, strict=True)]
        assert torch.equal(batch, torch.stack(single))
        assert pixel_hashes(batch).tolist() == [pixel_hash(x) for x in single]
