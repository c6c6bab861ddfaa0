from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, write_cifar100, write_image_folder

from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError


def test_digits_split_is_fixed_stratified_and_32x32():
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    share = np.bincount(test.labels, minlength=10) / (
        np.bincount(test.labels, minlength=10) + np.bincount(train.labels, minlength=10)
    )
    assert np.all(np.abs(share - 0.2) < 0.02)
    again = build_dataset("digits", split="train")
    assert again.fingerprint() == train.fingerprint()
    assert train.fingerprint() != test.fingerprint()


def test_cifar100_reads_the_pickle_folder(cifar_root: Path):
    ds = build_dataset("cifar100", cifar_root, "train")
    assert len(ds) == 96 and ds.num_classes == 100 and ds.small
    assert ds.image(5).shape == (32, 32, 3) and ds.image(5).dtype == np.uint8
    assert list(ds.labels[:3]) == [0, 1, 2]
    test = build_dataset("cifar100", cifar_root, "test")
    assert len(test) == 32
    other = write_cifar100(cifar_root.parent / "other", seed=1)
    assert build_dataset("cifar100", other, "train").fingerprint()["images_sha256"] != ds.fingerprint()["images_sha256"]


def test_imagenet_and_folder_read_imagefolder_trees(tmp_path: Path):
    write_image_folder(tmp_path / "imnet" / "train")
    write_image_folder(tmp_path / "imnet" / "val", per_class=2)
    ds = build_dataset("imagenet", tmp_path / "imnet", "train")
    assert len(ds) == 12 and ds.num_classes == 3 and not ds.small
    assert ds.image(0).shape == (40, 48, 3)
    assert len(build_dataset("imagenet", tmp_path / "imnet", "val")) == 6
    folder = build_dataset("folder", tmp_path / "imnet" / "train")
    assert folder.fingerprint()["files_sha256"] == ds.fingerprint()["files_sha256"]


@pytest.mark.parametrize("name", ["cifar100", "imagenet", "folder"])
def test_missing_root_is_a_clear_error(tmp_path: Path, name: str):
    with pytest.raises(KdcacheError, match=str(tmp_path / "nowhere")):
        build_dataset(name, tmp_path / "nowhere", "train")


def test_garbled_cifar_names_the_fix(cifar_root: Path):
    (cifar_root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(KdcacheError, match="unreadable.*--download"):
        build_dataset("cifar100", cifar_root, "train")


def test_cli_missing_dataset_exits_2_with_one_line(tmp_path: Path, teacher_ckpt):
    proc = run_cli(
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        "--dataset",
        "cifar100",
        "--data-root",
        str(tmp_path / "nope"),
        "--augment",
        "cifar",
        "--views",
        "1",
        "--out",
        str(tmp_path / "c.zarr"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--download" in proc.stderr
    assert not (tmp_path / "c.zarr").exists()
