"""Which torch device a run uses, and the CUDA settings that make its results repeatable."""

from __future__ import annotations

import os

import torch

from kdcache.errors import KdcacheError


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

    That mode also fills every tensor ``torch.empty``, ``.to()`` or
    ``.clone()`` allocates with NaN, a debugging aid PyTorch documents as
    safe to turn off for code that never reads uninitialized memory, which
    kdcache does not. It is off: on a CPU tensor the fill runs on torch's
    thread pool, and while loader workers keep the cores busy each fill of a
    block's pinned logits waits milliseconds for a descheduled pool thread
    (``bench/pool_stall.py``).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    # torch declares this setting as a property of a class it swaps in for the module's, which its typing cannot show.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
