import numpy as np
import pytest

from kdcache.data import build_dataset
from kdcache.errors import KdcacheError
from kdcache.views import CIFAR_ALL_VIEWS, make_recipe, pixel_hash


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits")


def test_params_depend_only_on_seed_view_sample_kind():
    r = make_recipe("mlkd", True)
    a = [r.params(3, v, i, k, (32, 32)) for v, i, k in [(0, 1, 0), (5, 9, 1), (2, 2, 1)]]
    np.random.seed(123)  # global RNG state must not matter
    b = [r.params(3, v, i, k, (32, 32)) for v, i, k in reversed([(0, 1, 0), (5, 9, 1), (2, 2, 1)])][::-1]
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(r.params(3, 0, 1, 0, (32, 32)), r.params(4, 0, 1, 0, (32, 32)))
    assert len(r.params(0, 0, 0, 1, (32, 32))) == len(r.fields(1)) == 10


def test_all_cifar_views_are_the_162_distinct_crop_flips(digits):
    r = make_recipe("cifar", True)
    params = {tuple(r.params(0, v, 7, 0, (32, 32), all_views=True)) for v in range(CIFAR_ALL_VIEWS)}
    assert params == {(t, l, f) for t in range(9) for l in range(9) for f in range(2)}
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
    p[-3:] = [16, 16, 8]
    p[3], p[5] = 5, 5  # Identity ops, so only crop, flip and cutout act
    view = r.apply(digits.image(0), p, 1).numpy()
    assert (view[:, 12:20, 12:20] == np.array([125, 123, 114])[:, None, None]).all()


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
