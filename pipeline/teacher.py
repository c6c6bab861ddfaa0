"""Running a teacher the same way everywhere: eval mode, inference mode, fixed-size padded blocks, channels-last.

CPU and GPU kernels pick different algorithms for different batch shapes, so
the same image can get logits that differ in the last bits with batch size 1
and 64. The teacher therefore always runs in blocks of exactly
``forward_block`` images (the last block zero-padded): a sample's logits then
depend only on its pixels, not on ``--batch-size`` or on what else is in the
batch. Stage one records the block size; online training uses the same.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.data import Normalization
from kdcache.errors import KdcacheError
from kdcache.models import create_model, file_sha256, load_checkpoint
from kdcache.views import normalize

AMP_MODES = ("none", "bf16", "fp16")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is refused. A CUDA device gets deterministic kernels."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KdcacheError("--device cuda but no CUDA GPU is visible: use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise KdcacheError(f"unknown --device {device!r}: choose auto, cpu or cuda")
    if device.startswith("cuda"):
        deterministic_cuda()
    return torch.device(device)


def deterministic_cuda() -> None:
    """Make CUDA kernels deterministic for the whole process (cuDNN's fixed algorithms, cuBLAS's fixed workspace).

    By default cuDNN may pick a different convolution algorithm from run to
    run and its backward passes reduce with atomics, so two identical training
    runs drift apart in the last bits. kdcache promises bit-identical logits
    between a dump and an online teacher, and bit-identical students after a
    resume, so every process that puts kdcache on a GPU runs with
    ``torch.use_deterministic_algorithms(True)``.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


@dataclass
class LaunchedLogits:
    """Logits on their way to the host: :meth:`result` waits for the copy to land."""

    host: torch.Tensor
    done: torch.cuda.Event | None

    def result(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


@dataclass
class Teacher:
    """A frozen teacher and how it was made (recorded in every cache)."""

    model: nn.Module
    name: str
    checkpoint_sha256: str | None
    weights: str | None
    norm: Normalization
    device: torch.device
    forward_block: int = 64
    amp: str = "none"

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """float32 logits of a uint8 NCHW batch of views, computed in padded blocks of ``forward_block``."""
        return self.launch(views).result()

    @torch.inference_mode()
    def launch(self, views: torch.Tensor) -> LaunchedLogits:
        """Start the forward pass of ``views`` and return at once; on a GPU the work runs while the caller does other things.

        The logits come back to the host through one asynchronous copy, so a
        dump can launch the next batch before it stores this one's rows.
        """
        n = views.shape[0]
        outs = []
        for start in range(0, n, self.forward_block):
            block = views[start : start + self.forward_block].to(self.device, non_blocking=True)
            real = block.shape[0]
            if real < self.forward_block:
                pad = block.new_zeros((self.forward_block - real, *block.shape[1:]))
                block = torch.cat([block, pad])
            x = normalize(block, self.norm.mean, self.norm.std).contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.model(x)
            outs.append(logits[:real].float())
        logits = torch.cat(outs)
        if self.device.type != "cuda":
            return LaunchedLogits(logits, None)
        done = torch.cuda.Event()
        host = logits.to("cpu", non_blocking=True)
        done.record()
        return LaunchedLogits(host, done)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def identity(self) -> dict[str, object]:
        """What a cache records about its teacher and that a resume must match."""
        return {"name": self.name, "checkpoint_sha256": self.checkpoint_sha256, "weights": self.weights,
                "forward_block": self.forward_block, "amp": self.amp}


def load_teacher(name: str, num_classes: int, norm: Normalization, checkpoint: str | None = None,
                 weights: str | None = None, device: str = "auto", forward_block: int = 64, amp: str = "none") -> Teacher:
    """Build, load and freeze a teacher for ``num_classes`` classes."""
    if forward_block < 1:
        raise KdcacheError(f"--forward-block must be at least 1, got {forward_block}")
    if amp not in AMP_MODES:
        raise KdcacheError(f"unknown --amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    if not checkpoint and not weights:
        raise KdcacheError(f"teacher {name} has no trained weights: pass --checkpoint PATH (or --weights NAME for torchvision.<arch>)")
    dev = resolve_device(device)
    model = create_model(name, num_classes, weights)
    sha = None
    if checkpoint:
        load_checkpoint(model, checkpoint)
        sha = file_sha256(checkpoint)
    model.eval().requires_grad_(False).to(dev, memory_format=torch.channels_last)
    return Teacher(model, name, sha, weights, norm, dev, forward_block, amp)
