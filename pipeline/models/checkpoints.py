"""Checkpoint files: saving a model with its training state, loading a state dict from the forms the zoos publish."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdcache.errors import KdcacheError, first_line
from kdcache.models.zoo import _REGISTRY


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{"model": sd}``, ``{"state_dict": sd}`` or a bare ``sd``; ``module.``
    prefixes dropped."""
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise KdcacheError(
            "checkpoint holds no state dict: expected {'model': ...}, {'state_dict': ...} or a bare state dict"
        )
    prefix = "module."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def guess_architecture(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the zoo model whose keys and shapes match ``sd`` exactly, if any."""
    fc = [v for k, v in sd.items() if k.endswith("weight") and v.ndim == 2]
    classes = fc[-1].shape[0] if fc else 100
    with torch.device("meta"):
        for name, ctor in _REGISTRY.items():
            ref = ctor(classes).state_dict()
            if ref.keys() == sd.keys() and all(ref[k].shape == sd[k].shape for k in ref):
                return name
    return None


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint file into ``model`` strictly and return it.

    Accepts the mdistiller / RepDistiller layout ``{"model": state_dict, ...}``,
    ``{"state_dict": ...}``, a bare state dict and DataParallel ``module.``
    prefixes. Mismatched keys or shapes, and non-finite weights, are refused
    with a message that lists them and names the architecture the file fits.
    """
    path = Path(path)
    if not path.is_file():
        raise KdcacheError(f"checkpoint {path} not found: pass the path of a .pth file with --checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a garbled or foreign file
        raise KdcacheError(f"cannot read checkpoint {path}: {first_line(exc)}; is it a torch .pth file?") from None
    sd = extract_state_dict(obj)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch ({'; '.join(shapes[:3])})")
        guess = guess_architecture(sd)
        fits = f"the file looks like a {guess} checkpoint" if guess else "no zoo architecture matches it"
        raise KdcacheError(f"checkpoint {path} does not fit {type(model).__name__}: {', '.join(parts)}; {fits}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise KdcacheError(
            f"checkpoint {path} has non-finite weights in {', '.join(bad[:3])}: the training run that wrote it diverged"
        )
    model.load_state_dict(sd, strict=True)
    return model


def save_checkpoint(path: str | Path, model: nn.Module, **extra: object) -> None:
    """Write ``{"model": state_dict, **extra}`` atomically, the layout ``load_checkpoint`` and the zoo use."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), **extra}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
