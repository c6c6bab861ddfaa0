"""How a student computes: autocast dtype, memory format and the gradient scaler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcache.settings import TRAIN_DEFAULTS as T


@dataclass(frozen=True)
class Precision:
    """How the student computes: autocast dtype (``amp``) and memory format, on ``device``."""

    device: torch.device
    amp: str = T.amp
    channels_last: bool = T.channels_last

    def autocast(self) -> torch.autocast:
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != "none")

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active for fp16 (whose small gradients would underflow)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
