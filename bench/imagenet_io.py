"""ImageNet-scale I/O: JPEG decodes per stored view, the view builder's rate, and a student epoch's bytes read.

Run by hand: ``python bench/imagenet_io.py``. It writes an ImageFolder of
``--images`` JPEGs at ImageNet sizes (random crops and rescales of the two
photographs scikit-learn ships, JPEG quality 60-95) into a temporary folder,
then measures, alternating the two settings in one run:

* decodes: JPEG decodes per stored view when the dump's loader builds
  ``--views`` views of every image in work units, against one view per unit;
* rate: views/s of the dump's loader alone (views built, nothing run or
  stored) at ``--views`` views against 1 view;
* bytes: what one student epoch reads from a 16-view seeded cache larger than
  its memory budget, with the chunk-aligned view schedule and with per-sample
  draws, against one view's bytes on disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from kdcache.dataset.datasets import FolderDataset, build_dataset
from kdcache.dump.chunks import ViewSet, plan_units
from kdcache.dump.loop import view_batches
from kdcache.feed.logits import LogitFeed, epoch_views
from kdcache.store.cache import CHUNK, create_store, num_chunks, open_store
from kdcache.views.recipes import make_recipe


def write_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` JPEGs in 10 class folders, each a random crop of a sample photo rescaled to ImageNet sizes."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for j in range(images):
        photo = photos[j % len(photos)]
        h, w = rng.integers(200, photo.shape[0]), rng.integers(200, photo.shape[1])
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        scale = rng.uniform(0.8, 1.4)
        im = Image.fromarray(photo[y : y + h, x : x + w]).resize((int(w * scale), int(h * scale)))
        folder = root / "train" / f"class{j % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{j}.jpg", quality=int(rng.integers(60, 96)))
    return root


class CountingFolder(FolderDataset):
    """A :class:`FolderDataset` that counts its JPEG decodes."""

    decodes = 0

    def image(self, index: int) -> np.ndarray:
        type(self).decodes += 1
        return super().image(index)


def loader_pass(ds: FolderDataset, views: int, batch_size: int, workers: int) -> tuple[float, int, int]:
    """Build every view of a ``views``-view dump once, as the dump's loader does; (seconds, views, decodes)."""
    recipe = make_recipe("imagenet", False)
    done = np.zeros((views, num_chunks(len(ds))), dtype=bool)
    units = plan_units(done, row_bytes=2000)  # ImageNet-1k float16 rows
    items = np.concatenate([u.items(len(ds)) for u in units])
    CountingFolder.decodes = 0
    start = time.perf_counter()
    for _ in view_batches(ViewSet(ds, recipe, 0, items, False), batch_size, workers, pin=False):
        pass
    return time.perf_counter() - start, len(items), CountingFolder.decodes


def epoch_bytes(root: Path, samples: int, views: int, classes: int) -> dict[str, float]:
    """Bytes one epoch reads from a ``views``-view seeded cache over budget, per schedule, in views' worth."""
    path = root / "cache.zarr"
    store = create_store(
        path,
        num_views=views,
        labels=np.zeros(samples, np.int64),
        num_classes=classes,
        dtype="float16",
        kinds=1,
        param_fields=[["top", "left", "height", "width", "flip"]],
        attrs={},
    )
    rng = np.random.default_rng(0)
    for v in range(views):
        store.group["logits"][v] = rng.normal(size=(samples, classes)).astype(np.float16)
        store.group["params"][v] = rng.integers(0, 200, size=(samples, 5)).astype(np.float32)
        store.group["view_hash"][v] = rng.integers(0, 2**63, size=samples, dtype=np.uint64)
    names = ["logits", "params", "view_hash"]
    one_view = statistics.mean(
        sum(f.stat().st_size for n in names for f in (path / n / "c" / str(v)).rglob("*") if f.is_file())
        for v in range(views)
    )
    out = {}
    for schedule in ("chunk", "sample"):
        feed = LogitFeed(open_store(path), names, memory_bytes=one_view)  # a budget below the cache's size
        rchar = []
        for epoch in range(3):
            before = _rchar()
            feed.get(epoch, epoch_views(0, epoch, samples, views, False, schedule))
            rchar.append(_rchar() - before)
        feed.close()
        out[schedule] = statistics.median(rchar) / one_view
    return out


def _rchar() -> int:
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--student-samples", type=int, default=3 * CHUNK)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), args.images)
        base = build_dataset("folder", root, "train")
        ds = CountingFolder(base.name, base.split, base.root, base.norm)
        rates = {1: [], args.views: []}
        decodes = {}
        for _ in range(args.repeats):
            for views in (args.views, 1):
                seconds, n, dec = loader_pass(ds, views, args.batch_size, args.workers)
                rates[views].append(n / seconds)
                decodes[views] = dec / n
        ratio = [a / b for a, b in zip(rates[args.views], rates[1], strict=True)]
        print(f"{args.images} JPEGs, batch {args.batch_size}, workers {args.workers}, {args.repeats} alternated rounds")
        for views in (1, args.views):
            print(
                f"--views {views}: {decodes[views]:.3f} decodes per view, loader {statistics.median(rates[views]):.0f}"
                f" views/s ({', '.join(f'{r:.0f}' for r in rates[views])})"
            )
        print(
            f"loader rate --views {args.views} / --views 1: median {statistics.median(ratio):.2f} "
            f"({', '.join(f'{r:.2f}' for r in ratio)})"
        )
        read = epoch_bytes(Path(tmp), args.student_samples, 16, args.classes)
        print(
            f"student epoch from a 16-view cache ({args.student_samples} samples, {args.classes} classes, over budget):"
            f" chunk schedule {read['chunk']:.2f} views' worth, per-sample schedule {read['sample']:.2f}"
        )


if __name__ == "__main__":
    main()
