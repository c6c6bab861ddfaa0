"""Distil a student from a kdcache cache in a plain PyTorch loop, with a distillation loss of your own.

The teacher never runs: every ``kdcache.Batch`` holds the augmented views the teacher saw at dump time and the
teacher's cached logits for exactly those views, so the loop is ordinary supervised training plus one extra term.

    python examples/own_loop.py --cache data/quickstart/cache-cifar.zarr --epochs 6

With ``--run-dir`` the loop also keeps a run folder as ``train-student`` does (``config.yaml`` and, through
``kdcache.RunLog``, ``metrics.jsonl``) and ends with ``kdcache.write_report`` on the folder above it: every run there,
mean ± std over the seeds of the same settings, in ``results.md``.

    for seed in 0 1 2; do
        python examples/own_loop.py --cache data/quickstart/cache-cifar.zarr --epochs 6 --seed $seed \\
            --run-dir runs/rkl/seed-$seed
    done
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import kdcache
from kdcache import build_dataset, eval_loader, evaluate, save_checkpoint, test_split


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mode-seeking ``τ² · KL(p_student ‖ p_teacher)`` at temperature τ, batch mean: the student may ignore
    classes the teacher gives some mass but must not put mass where the teacher puts none."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return (log_s.exp() * (log_s - log_t)).sum(dim=1).mean() * temperature**2


def start_run_dir(args: argparse.Namespace) -> kdcache.RunLog:
    """``config.yaml`` with the run's settings (the report groups runs by them, all but the seed) and the run's log."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "run_dir", "device")}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    (args.run_dir / "config.yaml").write_text(yaml.safe_dump({"loss": "reverse_kl", **settings}))
    return kdcache.RunLog(args.run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description="Train a student from cached teacher logits with a reverse-KL loss.")
    p.add_argument("--cache", required=True, help="a store written by `kdcache dump-logits`")
    p.add_argument("--dataset", default="digits", help="the dataset the cache was dumped from")
    p.add_argument("--data-root", help="dataset folder (digits needs none)")
    p.add_argument("--student", default="resnet8", help="any `kdcache models` name")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="student init, sample order and view draws")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="save the trained student here ({'model': state_dict})")
    p.add_argument("--run-dir", type=Path, help="write config.yaml and metrics.jsonl here, a report in its parent")
    args = p.parse_args()
    log = start_run_dir(args) if args.run_dir else None

    train = build_dataset(args.dataset, args.data_root, "train")
    test = build_dataset(args.dataset, args.data_root, test_split(args.dataset))
    loader = kdcache.DistillLoader(
        args.cache, train, batch_size=args.batch_size, seed=args.seed, device=args.device, epochs=args.epochs
    )
    test_batches = eval_loader(test, loader.recipe)  # uint8 eval views; evaluate() normalizes them
    torch.manual_seed(args.seed)
    student = kdcache.create_model(args.student, loader.num_classes).to(loader.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loader.set_epoch(epoch)  # views and order of this epoch, as the cache scheduled them
        student.train()
        loss_sum, seen = 0.0, 0
        for batch in loader:
            logits = student(batch.views[0])
            kd = reverse_kl(logits, batch.teacher[0], args.temperature)
            loss = F.cross_entropy(logits, batch.labels) + args.kd_weight * kd
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(batch.ids), seen + len(batch.ids)
        metrics = evaluate(student, test_batches, test.norm, loader.device, test.num_classes)
        print(f"epoch {epoch + 1} train_loss {loss_sum / seen:.6f} test_top1 {metrics['test_top1']:.2f}")
        if log is not None:  # the fields train-student logs, which kdcache.write_report reads
            seconds = time.perf_counter() - t0
            log.write({"epoch": epoch + 1, "train_loss": loss_sum / seen, **metrics, "seconds": seconds})
    loader.close()
    seen_by_teacher = kdcache.open_store(args.cache).attrs.get("teacher_top1") or [float("nan")]
    teacher = 100 * sum(seen_by_teacher) / len(seen_by_teacher)
    print(f"final test top-1 {metrics['test_top1']:.2f}% (the teacher: {teacher:.2f}% on its cached training views)")
    if args.out:
        save_checkpoint(args.out, student)
    if log is not None:
        log.close()
        report = kdcache.write_report(args.run_dir.parent)  # this run and the other seeds beside it
        print(f"report {report.results_md}")


if __name__ == "__main__":
    main()
