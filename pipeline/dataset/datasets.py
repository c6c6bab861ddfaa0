"""Datasets that hand out uint8 images *before* augmentation, plus integer labels.

Views are built later (:mod:`kdcache.views.recipes`) from these raw images, so they can
be replayed and hashed. Every dataset has a :meth:`ImageDataset.fingerprint`
that caches record and stage two checks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from kdcache.errors import KdcacheError, first_line
from kdcache.settings import DUMP_DEFAULTS as D

DATASETS = ("cifar100", "imagenet", "folder", "digits")
SPLITS = ("train", "test", "val")
DEFAULT_ROOT = Path("data")

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Measured once on the digits train split as built below (a fact about the data, like CIFAR's constants).
DIGITS_MEAN, DIGITS_STD = (0.3062, 0.3062, 0.3062), (0.3243, 0.3243, 0.3243)

T = TypeVar("T")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied to ``uint8 / 255`` images on the device."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ImageDataset:
    """Images as uint8 HWC numpy arrays with labels; ``small`` datasets are 32x32 (CIFAR-style recipes)."""

    name: str
    split: str
    num_classes: int
    labels: np.ndarray
    small: bool
    norm: Normalization

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        """The uint8 HxWx3 image ``index`` before any augmentation."""
        raise NotImplementedError

    def check_images(self, samples: Iterable[int] | None = None) -> None:
        """Refuse images of ``samples`` (default all) that do not decode; in-memory datasets always do."""

    def _extra_fingerprint(self) -> dict[str, str]:
        return {}

    def fingerprint(self) -> dict[str, object]:
        """Identity of the data a cache was made from: name, split, length, label and image hashes."""
        labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        h = hashlib.sha256()
        n = len(self)
        for i in sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, 64))}):
            img = np.ascontiguousarray(self.image(i))
            h.update(np.asarray(img.shape, dtype=np.int64).tobytes())
            h.update(img.tobytes())
        return {
            "name": self.name,
            "split": self.split,
            "length": n,
            "num_classes": self.num_classes,
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "images_sha256": h.hexdigest(),
            **self._extra_fingerprint(),
        }


class ArrayDataset(ImageDataset):
    """A dataset held in memory as an (N, H, W, 3) uint8 array."""

    def __init__(
        self, name: str, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int, norm: Normalization
    ):
        self.name, self.split, self.num_classes, self.norm = name, split, num_classes, norm
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.small = self.images.shape[1] <= 64

    def image(self, index: int) -> np.ndarray:
        return self.images[index]


class FolderDataset(ImageDataset):
    """torchvision ``ImageFolder`` tree, decoded lazily to RGB uint8 with PIL."""

    def __init__(self, name: str, split: str, root: Path, norm: Normalization):
        from torchvision.datasets import ImageFolder

        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as exc:
            raise KdcacheError(
                f"no ImageFolder tree at {root} ({first_line(exc, 120)}): expected {root}/<class>/<image> files"
            ) from None
        self.name, self.split, self.norm, self.root = name, split, norm, root
        self.classes = folder.classes
        self.num_classes = len(folder.classes)
        self.paths = [p for p, _ in folder.samples]
        self.labels = np.asarray([c for _, c in folder.samples], dtype=np.int64)
        self.small = False

    def image(self, index: int) -> np.ndarray:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
            raise KdcacheError(f"cannot decode image {path} ({first_line(exc, 120)}): remove or replace it") from None

    def check_images(self, samples: Iterable[int] | None = None) -> None:
        """Decode every image of ``samples`` (default all) on a thread pool; refuse naming the first bad file.

        PIL's ``verify()`` passes a truncated JPEG, so each file is decoded; a
        JPEG at 1/8 scale (``draft``), which still reads every coefficient, in
        about half a full decode's time.
        """
        paths = [self.paths[i] for i in (range(len(self)) if samples is None else samples)]
        with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            failures = [(p, why) for p, why in zip(paths, pool.map(_decode_failure, paths), strict=True) if why]
        if failures:
            path, why = failures[0]
            more = f"; {len(failures) - 1} more fail too, e.g. {failures[1][0]}" if len(failures) > 1 else ""
            raise KdcacheError(f"cannot decode image {path} ({why}): remove or replace it{more}")

    def _extra_fingerprint(self) -> dict[str, str]:
        rel = "\n".join(str(Path(p).relative_to(self.root)) for p in self.paths)
        return {
            "files_sha256": hashlib.sha256(rel.encode()).hexdigest(),
            "classes_sha256": hashlib.sha256("\n".join(self.classes).encode()).hexdigest(),
        }


def _decode_failure(path: str) -> str | None:
    """Why the image at ``path`` does not decode to RGB (the first line of the decoder's error), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))  # JPEG: the smallest DCT scale; other formats ignore it
            im.convert("RGB")
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
        return first_line(exc, 120)
    return None


def worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """Iterate a multi-process DataLoader, re-raising a worker's KdcacheError as its own one-line message.

    torch re-raises a worker's exception with the worker's traceback as its
    message, which the CLI would print whole; the original message is its last line.
    """
    try:
        yield from batches
    except KdcacheError as exc:
        text = str(exc)
        if not text.startswith("Caught KdcacheError"):
            raise
        raise KdcacheError(text.rstrip().splitlines()[-1].partition("KdcacheError: ")[2]) from None


def _digits(split: str) -> ArrayDataset:
    """scikit-learn's 1,797 handwritten 8x8 digits, upscaled to 32x32 RGB, fixed stratified 80/20 split."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.from_numpy(raw.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    img = x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    images = np.repeat(img[..., None], 3, axis=3)
    y = raw.target.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(20240617))
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(0.2 * len(idx)))]] = True
    keep = np.flatnonzero(test if split == "test" else ~test)
    return ArrayDataset("digits", split, images[keep], y[keep], 10, Normalization(DIGITS_MEAN, DIGITS_STD))


def _cifar100(root: Path, split: str, download: bool) -> ArrayDataset:
    from torchvision.datasets import CIFAR100

    class _Cifar100(CIFAR100):
        # torchvision checks the md5 of the official archive; kdcache records its own
        # dataset fingerprint instead, so re-packed or trimmed copies load too.
        meta = {**CIFAR100.meta, "md5": None}

        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    try:
        ds = _Cifar100(str(root), train=split == "train", download=download)
    except OSError as exc:
        if not download or not _network_error(exc):
            raise KdcacheError(f"cannot read CIFAR-100 under {root} ({exc.__class__.__name__}: {exc})") from None
        raise KdcacheError(
            f"cannot reach the download server ({exc.__class__.__name__}): check the network, or place "
            f"cifar-100-python/ under {root}"
        ) from None
    except RuntimeError:
        raise KdcacheError(
            f"CIFAR-100 not found under {root}/cifar-100-python: pass --download (needs internet) or --data-root "
            "DIR holding cifar-100-python/"
        ) from None
    except Exception as exc:  # unpickling a damaged file raises anything
        raise KdcacheError(
            f"CIFAR-100 files under {root}/cifar-100-python are unreadable ({exc.__class__.__name__}): delete the "
            "folder and re-run with --download"
        ) from None
    return ArrayDataset("cifar100", split, ds.data, np.asarray(ds.targets), 100, Normalization(CIFAR_MEAN, CIFAR_STD))


def _network_error(exc: BaseException) -> bool:
    """Whether a download failed for want of a network (not a full disk or a folder it cannot write)."""
    import socket
    import urllib.error

    return isinstance(exc, urllib.error.URLError | socket.timeout | ConnectionError | TimeoutError) or (
        "urlopen" in str(exc) or "Name or service" in str(exc)
    )


def check_dataset(ds: ImageDataset) -> None:
    """Refuse a split with no images, or labels outside ``[0, num_classes)``, before anything is stored from it."""
    root = getattr(ds, "root", None)
    where = f"{ds.name} split {ds.split!r}" + (f" at {root}" if root else "")
    if len(ds) == 0:
        raise KdcacheError(f"{where} holds no images: check --data-root and --split")
    labels = np.asarray(ds.labels)
    bad = np.flatnonzero((labels < 0) | (labels >= ds.num_classes))
    if len(bad):
        raise KdcacheError(
            f"{where}: sample {int(bad[0])} has label {int(labels[bad[0]])}, outside 0..{ds.num_classes - 1} "
            f"({len(bad)} such samples): fix the dataset's labels"
        )


def build_dataset(
    name: str, root: str | Path | None = None, split: str = D.split, download: bool = D.download
) -> ImageDataset:
    """Open dataset ``name`` (one of :data:`DATASETS`) for ``split``.

    ``cifar100`` reads torchvision's ``cifar-100-python`` folder under ``root``
    (default ``data/``); ``imagenet`` reads ``<root>/train`` or ``<root>/val``
    ImageFolder trees (default ``data/imagenet``); ``folder`` reads ``<root>/<split>``
    if it exists, else ``root`` itself; ``digits`` needs no files.
    """
    if name not in DATASETS:
        raise KdcacheError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise KdcacheError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if name == "digits":
        return _digits("test" if split in ("test", "val") else "train")
    if name == "cifar100":
        return _cifar100(Path(root or DEFAULT_ROOT), "test" if split in ("test", "val") else "train", download)
    if download:
        raise KdcacheError(f"--download is not available for {name}: ImageNet must be obtained from image-net.org")
    norm = Normalization(IMAGENET_MEAN, IMAGENET_STD)
    if name == "imagenet":
        base = Path(root or DEFAULT_ROOT / "imagenet")
        sub = base / ("train" if split == "train" else "val")
        if not sub.is_dir():
            raise KdcacheError(
                f"ImageNet split folder {sub} not found: pass --data-root DIR holding train/ and val/ class folders"
            )
        return FolderDataset("imagenet", split, sub, norm)
    if root is None:
        raise KdcacheError("dataset 'folder' needs --data-root pointing at an ImageFolder tree")
    base = Path(root)
    sub = base / split if (base / split).is_dir() else base
    if not sub.is_dir():
        raise KdcacheError(f"folder dataset root {sub} not found: pass --data-root DIR of an ImageFolder tree")
    return FolderDataset("folder", split, sub, norm)


def test_split(name: str) -> str:
    """The evaluation split's name for a dataset (``val`` for ImageNet, else ``test``)."""
    return "val" if name == "imagenet" else "test"
