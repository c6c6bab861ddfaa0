"""An mdistiller-style ``Distiller`` whose teacher logits come from a kdcache cache, not a teacher forward pass.

mdistiller's ``KD`` (``mdistiller/distillers/KD.py``) runs the teacher on every batch. Ported to kdcache, the
trainer passes the teacher's cached logits of exactly the batch's views in as a keyword, and the distiller holds
no teacher. What changes relative to mdistiller, line by line:

- ``Distiller.__init__(self, student, teacher)`` becomes ``__init__(self, student)`` and ``KD.__init__(self, student,
  teacher, cfg)`` becomes ``__init__(self, student, cfg)``; the ``train()`` override that kept the teacher in eval
  mode goes, as there is no teacher module.
- ``with torch.no_grad(): logits_teacher, _ = self.teacher(image)`` becomes the ``teacher_logits`` argument of
  ``forward_train``.
- ``logits_student, _ = self.student(image)`` becomes ``logits_student = self.student(image)`` (and
  ``forward_test`` drops its ``[0]``): kdcache's models return logits, not ``(logits, features)``.
- The trainer's ``self.distiller(image=image, target=target, epoch=epoch)`` adds
  ``teacher_logits=batch.teacher[0]``; its batches come from ``kdcache.DistillLoader`` instead of a
  ``DataLoader`` of ``(image, target, index)``, and its validation is ``kdcache.evaluate`` of the student.

Everything else, the config keys, the loss (``kdcache.kd_loss`` is mdistiller's ``kd_loss``: KL summed over
classes, batch mean, times τ²), the weights and the sum of ``losses_dict``, is mdistiller's.

    python examples/mdistiller_distiller.py --cache data/quickstart/cache-cifar.zarr --epochs 6
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import kdcache
from kdcache import build_dataset, eval_loader, evaluate, kd_loss, test_split


class Distiller(nn.Module):
    """mdistiller's ``_base.Distiller`` without a teacher module."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def get_extra_parameters(self) -> int:
        return 0

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs) -> tuple:
        raise NotImplementedError()

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)

    def forward(self, **kwargs) -> torch.Tensor | tuple:
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class KD(Distiller):
    """Distilling the Knowledge in a Neural Network, from cached teacher logits."""

    def __init__(self, student: nn.Module, cfg: SimpleNamespace):
        super().__init__(student)
        self.temperature = cfg.KD.TEMPERATURE
        self.ce_loss_weight = cfg.KD.LOSS.CE_WEIGHT
        self.kd_loss_weight = cfg.KD.LOSS.KD_WEIGHT

    def forward_train(
        self, image: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_student = self.student(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = self.kd_loss_weight * kd_loss(logits_student, teacher_logits, self.temperature)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}


def main() -> None:
    p = argparse.ArgumentParser(description="mdistiller's KD distiller trained from a kdcache cache.")
    p.add_argument("--cache", required=True, help="a store written by `kdcache dump-logits`")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", help="dataset folder (digits needs none)")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args()
    # mdistiller's CIFAR-100 KD defaults (mdistiller/engine/cfg.py); a yacs CfgNode of theirs works unchanged.
    cfg = SimpleNamespace(
        KD=SimpleNamespace(TEMPERATURE=4.0, LOSS=SimpleNamespace(CE_WEIGHT=0.1, KD_WEIGHT=0.9)),
        SOLVER=SimpleNamespace(BATCH_SIZE=64, LR=0.05, MOMENTUM=0.9, WEIGHT_DECAY=5e-4),
    )

    train = build_dataset(args.dataset, args.data_root, "train")
    test = build_dataset(args.dataset, args.data_root, test_split(args.dataset))
    loader = kdcache.DistillLoader(
        args.cache, train, batch_size=cfg.SOLVER.BATCH_SIZE, device=args.device, epochs=args.epochs
    )
    test_batches = eval_loader(test, loader.recipe)
    distiller = KD(kdcache.create_model(args.student, loader.num_classes), cfg).to(loader.device)
    optimizer = torch.optim.SGD(
        distiller.get_learnable_parameters(),
        lr=cfg.SOLVER.LR,
        momentum=cfg.SOLVER.MOMENTUM,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    for epoch in range(1, args.epochs + 1):  # mdistiller counts epochs from 1
        loader.set_epoch(epoch - 1)
        distiller.train()
        sums = {"loss_ce": 0.0, "loss_kd": 0.0}
        for batch in loader:
            optimizer.zero_grad()
            _, losses_dict = distiller(
                image=batch.views[0], target=batch.labels, epoch=epoch, teacher_logits=batch.teacher[0]
            )
            loss = sum(v.mean() for v in losses_dict.values())
            loss.backward()
            optimizer.step()
            for k, v in losses_dict.items():
                sums[k] += v.item() * len(batch.ids)
        metrics = evaluate(distiller.student, test_batches, test.norm, loader.device, test.num_classes)
        means = " ".join(f"{k} {v / len(train):.6f}" for k, v in sums.items())
        print(f"epoch {epoch} {means} test_top1 {metrics['test_top1']:.2f}")
    loader.close()
    seen_by_teacher = kdcache.open_store(args.cache).attrs.get("teacher_top1") or [float("nan")]
    teacher = 100 * sum(seen_by_teacher) / len(seen_by_teacher)
    print(f"final test top-1 {metrics['test_top1']:.2f}% (the teacher: {teacher:.2f}% on its cached training views)")


if __name__ == "__main__":
    main()
