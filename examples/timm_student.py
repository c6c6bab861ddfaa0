"""Distil into any timm model: ``kdcache.create_model("timm.<name>", num_classes)`` is the student.

A timm model is a plain ``nn.Module`` from images to logits, so the loop is the one of ``own_loop.py``; here the
distillation term is a built-in one from kdcache's loss registry (``kdcache losses`` lists them), run through
``kdcache.Objective`` with its published default weights. 32x32 inputs work with timm's convolutional models.

    python examples/timm_student.py --cache data/quickstart/cache-cifar.zarr --student timm.mobilenetv3_small_050
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

import kdcache
from kdcache import build_dataset, eval_loader, evaluate, test_split


def main() -> None:
    p = argparse.ArgumentParser(description="Train a timm student from cached teacher logits with a built-in loss.")
    p.add_argument("--cache", required=True, help="a store written by `kdcache dump-logits`")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", help="dataset folder (digits needs none)")
    p.add_argument("--student", default="timm.mobilenetv3_small_050", help="timm.<any timm.list_models() name>")
    p.add_argument("--loss", default="kd", help="kd, dkd, nkd, ... (`kdcache losses`) or module:function")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args()
    if args.student.startswith("timm.") and importlib.util.find_spec("timm") is None:
        sys.exit("timm_student.py needs timm: pip install 'kdcache[timm]' (or pass a zoo --student such as resnet8)")

    train = build_dataset(args.dataset, args.data_root, "train")
    test = build_dataset(args.dataset, args.data_root, test_split(args.dataset))
    spec = kdcache.get_loss(args.loss)
    # kinds=2 for MLKD: its weak and strong views (from an --augment mlkd cache), one student forward each.
    loader = kdcache.DistillLoader(
        args.cache,
        train,
        batch_size=args.batch_size,
        seed=args.seed,
        kinds=spec.kinds,
        device=args.device,
        epochs=args.epochs,
    )
    test_batches = eval_loader(test, loader.recipe)  # uint8 eval views; evaluate() normalizes them
    objective = kdcache.Objective.create(args.loss)  # the published weights, temperature and warm-up
    torch.manual_seed(args.seed)
    student = kdcache.create_model(args.student, loader.num_classes).to(loader.device)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    print(f"student {args.student}: {sum(p.numel() for p in student.parameters()):,} parameters; loss {spec.name}")

    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        student.train()
        loss_sum, seen = 0.0, 0
        for batch in loader:
            logits = [student(x) for x in batch.views]
            # The Objective counts epochs from 1 (DKD's warm-up, CTKD's schedule); set_epoch from 0.
            loss, _ = objective(logits, batch.teacher, batch.labels, epoch + 1, batch.mixed)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(batch.ids), seen + len(batch.ids)
        metrics = evaluate(student, test_batches, test.norm, loader.device, test.num_classes)
        print(f"epoch {epoch + 1} train_loss {loss_sum / seen:.6f} test_top1 {metrics['test_top1']:.2f}")
    loader.close()
    seen_by_teacher = kdcache.open_store(args.cache).attrs.get("teacher_top1") or [float("nan")]
    teacher = 100 * sum(seen_by_teacher) / len(seen_by_teacher)
    print(f"final test top-1 {metrics['test_top1']:.2f}% (the teacher: {teacher:.2f}% on its cached training views)")


if __name__ == "__main__":
    main()
