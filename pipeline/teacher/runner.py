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
from dataclasses import dataclass, field

import torch
from torch import nn

from kdcache.dataset.datasets import Normalization
from kdcache.devices import resolve_device
from kdcache.errors import KdcacheError
from kdcache.models.checkpoints import file_sha256, load_checkpoint
from kdcache.models.factory import check_model_name, create_model
from kdcache.settings import DUMP_DEFAULTS as D
from kdcache.settings import choices
from kdcache.views.recipes import normalize

AMP_MODES = choices("amp")


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
    forward_block: int = D.forward_block
    amp: str = D.amp
    _graphs: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.norm.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.norm.std, dtype=torch.float32, device=self.device)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """float32 logits of a uint8 NCHW batch of views, computed in padded blocks of ``forward_block``."""
        return self.launch(views).result()

    @torch.inference_mode()
    def launch(self, views: torch.Tensor) -> LaunchedLogits:
        """Start the forward pass of ``views`` and return at once; on a GPU the work runs while the caller does other
        things.

        On a GPU each block replays one captured CUDA graph of the forward
        pass, so issuing it costs a few calls instead of one per layer, and
        the logits come back through one asynchronous copy: a dump launches
        the next batch before it stores this one's rows.
        """
        n, fb = views.shape[0], self.forward_block
        if self.device.type != "cuda":
            outs = []
            for start in range(0, n, fb):
                block = views[start : start + fb]
                real = block.shape[0]
                if real < fb:
                    block = torch.cat([block, block.new_zeros((fb - real, *block.shape[1:]))])
                outs.append(self._forward(block)[:real])
            return LaunchedLogits(torch.cat(outs), None)
        graph, static_in, static_out = self._graph(tuple(views.shape[1:]))
        out = torch.empty((n, static_out.shape[1]), dtype=torch.float32, device=self.device)
        for start in range(0, n, fb):
            real = min(fb, n - start)
            static_in[:real].copy_(views[start : start + real], non_blocking=True)
            if real < fb:
                static_in[real:].zero_()
            graph.replay()
            out[start : start + real].copy_(static_out[:real])
        done = torch.cuda.Event()
        host = out.to("cpu", non_blocking=True)
        done.record()
        return LaunchedLogits(host, done)

    def _forward(self, block: torch.Tensor) -> torch.Tensor:
        """float32 logits of one uint8 block of exactly ``forward_block`` views on the teacher's device."""
        x = normalize(block.to(self.device), self._mean, self._std).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.model(x).float()

    def _graph(self, shape: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """The CUDA graph of one block's forward pass for views of ``shape`` (captured on first use), its input and
        output."""
        if shape not in self._graphs:
            static_in = torch.zeros((self.forward_block, *shape), dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN and cuBLAS set up their handles
                for _ in range(2):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: DataLoader's pin-memory thread may allocate pinned memory during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._forward(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    def identity(self) -> dict[str, object]:
        """What a cache records about its teacher and that a resume must match."""
        return {
            "name": self.name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights": self.weights,
            "forward_block": self.forward_block,
            "amp": self.amp,
        }


def load_teacher(
    name: str,
    num_classes: int,
    norm: Normalization,
    checkpoint: str | None = None,
    weights: str | None = None,
    device: str = D.device,
    forward_block: int = D.forward_block,
    amp: str = D.amp,
) -> Teacher:
    """Build, load and freeze a teacher for ``num_classes`` classes."""
    if forward_block < 1:
        raise KdcacheError(f"--forward-block must be at least 1, got {forward_block}")
    if amp not in AMP_MODES:
        raise KdcacheError(f"unknown --amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    check_model_name(name)
    if not checkpoint and not weights:
        raise KdcacheError(
            f"teacher {name} has no trained weights: pass --checkpoint PATH "
            "(or --weights NAME for torchvision.<arch> and timm.<name>)"
        )
    dev = resolve_device(device)
    model = create_model(name, num_classes, weights)
    sha = None
    if checkpoint:
        load_checkpoint(model, checkpoint)
        sha = file_sha256(checkpoint)
    model.eval().requires_grad_(False).to(dev).to(memory_format=torch.channels_last)
    return Teacher(model, name, sha, weights, norm, dev, forward_block, amp)
