"""What a top-K cache costs: bytes per sample, and KD / DKD loss error against the full cache, at 100 and 1000 classes.

No 100- or 1000-class dataset or pretrained teacher is available offline, so
the teachers are real trained networks on real handwritten digits: the
quickstart teacher's recipe (resnet8, cross-entropy, SGD) trained on 32x32
canvases holding two digits (100 classes, "37") or three (1000 classes,
"372"), built from scikit-learn's digits. Their logits have the structure
top-K truncation cares about: classes that share digits with the answer get
most of the remaining mass, like fine-grained ImageNet confusions.

For each class count: train the teacher, and a weaker student (3 epochs);
dump the teacher's logits with ``dump_logits`` as ``--format full`` (float16)
and ``topk:K``; then over the whole training set, in batches of 64, compare
each loss from the top-K cache with the same loss from the full cache:
relative error of the batch loss (mean over batches) and cosine similarity of
the gradient with respect to the student logits, for both tail models
(``tail="uniform"`` and ``tail="bucket"``, see :mod:`kdcache.store.formats`).
Run: ``python bench/topk_error.py`` (about 15 min on 2 CPU cores); writes
``bench/results/topk_error.md`` and ``bench/results/topk_error.png``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from sklearn.datasets import load_digits

from kdcache.dataset.datasets import ArrayDataset, Normalization
from kdcache.dump.loop import dump_logits
from kdcache.losses.functions import dkd_loss, kd_loss, topk_dkd_loss, topk_kd_loss
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.store.cache import disk_bytes
from kdcache.store.formats import TopKTeacher
from kdcache.views.recipes import normalize

NORM = Normalization((0.1, 0.1, 0.1), (0.25, 0.25, 0.25))
LOSSES = {
    "KD T=4": (lambda s, t, y: kd_loss(s, t, 4.0), lambda s, k, y, tail: topk_kd_loss(s, k, y, 4.0, tail=tail)),
    "KD+LS T=2": (
        lambda s, t, y: kd_loss(s, t, 2.0, True),
        lambda s, k, y, tail: topk_kd_loss(s, k, y, 2.0, True, tail),
    ),
    "DKD T=4": (
        lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
        lambda s, k, y, tail: topk_dkd_loss(s, k, y, 1.0, 8.0, 4.0, tail=tail),
    ),
}
TAILS = ("uniform", "bucket")


def composite_digits(digits: int, n: int, pool: np.ndarray, images: np.ndarray, labels: np.ndarray, seed: int) -> tuple:
    """``n`` 32x32 RGB canvases of ``digits`` side-by-side handwritten digits drawn from ``pool``; label = the
    number."""
    rng = np.random.default_rng(seed)
    side = 32 // digits
    glyphs = F.interpolate(
        torch.from_numpy(images[:, None].astype(np.float32)), size=(side, side), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    glyphs = np.clip(glyphs * (255 / 16), 0, 255).astype(np.uint8)
    canvas = np.zeros((n, 32, 32), np.uint8)
    y = np.zeros(n, np.int64)
    top = (32 - side) // 2
    for pos in range(digits):
        pick = rng.choice(pool, n)
        canvas[:, top : top + side, pos * side : (pos + 1) * side] = glyphs[pick]
        y = y * 10 + labels[pick]
    return np.repeat(canvas[..., None], 3, axis=3), y


def train(images: np.ndarray, labels: np.ndarray, classes: int, epochs: int, seed: int) -> torch.nn.Module:
    """resnet8 with cross-entropy and SGD (cosine LR), as the quickstart trains its teacher."""
    torch.manual_seed(seed)
    model = create_model("resnet8", classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(labels) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(labels)
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(len(labels))
        for s in range(0, len(order) - 127, 128):
            idx = order[s : s + 128]
            loss = F.cross_entropy(model(normalize(x_all[idx], NORM.mean, NORM.std)), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def logits_of(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    return torch.cat([model(normalize(x[s : s + 512], NORM.mean, NORM.std)) for s in range(0, len(x), 512)])


def compare(
    student: torch.Tensor, full: torch.Tensor, top: TopKTeacher, y: torch.Tensor, batch: int = 64
) -> dict[tuple, tuple]:
    """Per (loss, tail): mean relative batch-loss error and cosine of the gradient w.r.t. the student logits."""
    out = {}
    for name, (full_fn, top_fn) in LOSSES.items():
        for tail in TAILS:
            rel, g_full, g_top = [], [], []
            for s in range(0, len(y) - batch + 1, batch):
                sl = slice(s, s + batch)
                a = student[sl].clone().requires_grad_(True)
                b = student[sl].clone().requires_grad_(True)
                la = full_fn(a, full[sl], y[sl])
                lb = top_fn(
                    b, TopKTeacher(top.values[sl], top.indices[sl], top.stats[sl], top.num_classes), y[sl], tail
                )
                la.backward()
                lb.backward()
                rel.append(abs(lb.item() - la.item()) / la.item())
                g_full.append(a.grad.flatten())
                g_top.append(b.grad.flatten())
            cos = F.cosine_similarity(torch.cat(g_full), torch.cat(g_top), dim=0)
            out[name, tail] = (float(np.mean(rel)), float(cos))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--samples", type=int, nargs=2, default=[20000, 30000], help="training canvases at 100 and 1000 classes"
    )
    p.add_argument("--epochs", type=int, default=6, help="teacher epochs")
    p.add_argument(
        "--student-epochs", type=int, default=3, help="epochs of the (weaker) student whose loss is compared"
    )
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    d = load_digits()
    train_pool, test_pool = np.arange(0, 1300), np.arange(1300, len(d.target))
    rows, plot = [], {}
    for digits, n in zip((2, 3), args.samples, strict=True):
        classes = 10**digits
        t0 = time.perf_counter()
        x, y = composite_digits(digits, n, train_pool, d.images, d.target, seed=digits)
        xt, yt = composite_digits(digits, 5000, test_pool, d.images, d.target, seed=100 + digits)
        teacher = train(x, y, classes, args.epochs, seed=0)
        student = train(x, y, classes, args.student_epochs, seed=1)
        t_acc = float((logits_of(teacher, xt).argmax(1).numpy() == yt).mean())
        s_acc = float((logits_of(student, xt).argmax(1).numpy() == yt).mean())
        print(
            f"{classes} classes: teacher top-1 {100 * t_acc:.1f}%, student {100 * s_acc:.1f}% on held-out digits "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        ds = ArrayDataset(f"digits{digits}", "train", x, y, classes, NORM)
        s_logits = logits_of(student, x)
        yy = torch.from_numpy(y)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = f"{tmp}/teacher.pth"
            save_checkpoint(ckpt, teacher)
            common = dict(
                teacher="resnet8",
                checkpoint=ckpt,
                dataset=ds.name,
                augment="none",
                views=1,
                data=ds,
                progress=False,
                forward_block=256,
            )
            dump_logits(out=f"{tmp}/full.zarr", **common)
            full_bytes = disk_bytes(f"{tmp}/full.zarr") / n
            g = zarr.open_group(f"{tmp}/full.zarr", mode="r")
            full = torch.from_numpy(g["logits"][0].astype(np.float32))
            rows.append((classes, "full", full_bytes, None))
            for k in args.ks:
                dump_logits(out=f"{tmp}/top{k}.zarr", format=f"topk:{k}", **common)
                gk = zarr.open_group(f"{tmp}/top{k}.zarr", mode="r")
                top = TopKTeacher(
                    torch.from_numpy(gk["topk_values"][0].astype(np.float32)),
                    torch.from_numpy(gk["topk_indices"][0].astype(np.int64)),
                    torch.from_numpy(gk["row_stats"][0]),
                    classes,
                )
                result = compare(s_logits, full, top, yy)
                rows.append((classes, f"topk:{k}", disk_bytes(f"{tmp}/top{k}.zarr") / n, result))
                plot.setdefault(classes, []).append((k, result))
                print(
                    f"  topk:{k}: "
                    + "  ".join(f"{m}/{t} err {100 * e:.2f}% cos {c:.4f}" for (m, t), (e, c) in result.items()),
                    flush=True,
                )
        rows.append((classes, "teacher", t_acc, s_acc))
    write(rows, plot, Path(args.out), args)


def write(rows: list, plot: dict, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sizes = ["| classes | format | bytes per sample on disk (whole store) |", "|---:|---|---:|"]
    errors = [
        "| classes | K | loss | uniform tail: loss error | uniform tail: grad cosine | bucket tail: loss error | "
        "bucket tail: grad cosine |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    notes = []
    for classes, fmt, value, result in rows:
        if fmt == "teacher":
            notes.append(
                f"- {classes} classes: teacher top-1 {100 * value:.1f}%, student ({args.student_epochs} epochs) "
                f"{100 * result:.1f}% on held-out digits"
            )
            continue
        sizes.append(f"| {classes} | {fmt} | {value:,.1f} |")
        if result is not None:
            for m in LOSSES:
                (eu, cu), (eb, cb) = result[m, "uniform"], result[m, "bucket"]
                errors.append(
                    f"| {classes} | {fmt[5:]} | {m} | {100 * eu:.2f}% | {cu:.4f} | {100 * eb:.2f}% | {cb:.4f} |"
                )
    cmd = (
        f"python bench/topk_error.py --samples {args.samples[0]} {args.samples[1]} --epochs {args.epochs} "
        f"--student-epochs {args.student_epochs}"
    )
    text = "\n".join([f"`{cmd}`", "", *sizes, "", *errors, "", *notes, ""])
    (out / "topk_error.md").write_text(text)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plot), 2, figsize=(11, 3.6 * len(plot)), squeeze=False)
    for row, (classes, pts) in zip(axes, plot.items(), strict=True):
        ks = [k for k, _ in pts]
        for color, m in zip(("C0", "C1", "C2"), LOSSES, strict=True):
            for tail, style in zip(TAILS, (":", "-"), strict=True):
                label = f"{m}, {tail} tail"
                row[0].plot(ks, [100 * r[m, tail][0] for _, r in pts], style, marker="o", color=color, label=label)
                row[1].plot(ks, [r[m, tail][1] for _, r in pts], style, marker="o", color=color, label=label)
        row[0].set(
            xlabel="K kept logits",
            ylabel="relative loss error (%)",
            yscale="log",
            title=f"{classes} classes: batch loss vs full cache",
        )
        row[1].set(xlabel="K kept logits", ylabel="cosine", title=f"{classes} classes: gradient vs full cache")
        row[1].legend(fontsize=7)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.set_xticks(args.ks)
            ax.set_xticklabels([str(k) for k in args.ks])
    fig.tight_layout()
    fig.savefig(out / "topk_error.png", dpi=110)
    print(f"wrote {out / 'topk_error.md'} and {out / 'topk_error.png'}")


if __name__ == "__main__":
    main()
