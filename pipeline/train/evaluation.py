"""Test-split metrics of a model: top-1, top-5, NLL and expected calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache.train.precision import Precision
from kdcache.views.recipes import normalize


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    norm,
    device: torch.device,
    num_classes: int,
    precision: Precision | None = None,
) -> dict[str, float]:
    """Top-1, top-5, NLL and 15-bin ECE of ``model`` on ``loader``."""
    precision = precision or Precision(device)
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with precision.autocast():
            logits.append(model(precision.inputs(normalize(x.to(device), norm.mean, norm.std))).float().cpu())
        labels.append(y)
    z, y = torch.cat(logits), torch.cat(labels)
    return classification_metrics(z, y, num_classes)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, bins: int = 15
) -> dict[str, float]:
    """Accuracy (top-1, top-5), mean NLL and expected calibration error of a set of predictions."""
    prob = logits.softmax(dim=1)
    conf, pred = prob.max(dim=1)
    correct = (pred == labels).float()
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return {
        "test_top1": float(correct.mean() * 100),
        "test_top5": float(top5 * 100),
        "test_nll": float(F.cross_entropy(logits, labels)),
        "test_ece": float(ece),
    }
