"""A distillation loss of your own for ``kdcache train-student --loss my_loss:js_divergence``.

Any importable ``module:function`` with the signature ``(student_logits, teacher_logits, labels, **options)`` that
returns a scalar tensor is a loss; its keyword defaults are its options, set with ``--loss-opt name=value`` and
recorded in the run's ``config.yaml``. The trainer adds ``--ce-weight`` × cross-entropy and multiplies this term by
``--kd-weight`` (both 1 for a loss of your own), and logs the term's epoch mean as ``train_kd`` in ``metrics.jsonl``.

    PYTHONPATH=examples kdcache train-student --cache data/quickstart/cache-cifar.zarr --dataset digits \\
        --student resnet8 --loss my_loss:js_divergence --loss-opt temperature=2 --epochs 6 --out runs/js
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def js_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Jensen–Shannon divergence between the softened student and teacher distributions, batch mean.

    Symmetric and bounded (0 ≤ JS ≤ log 2), so a confident wrong teacher row cannot dominate a batch the way an
    unbounded KL term can. ``labels`` are unused: the term looks at the teacher only.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2.0)
    kl_sm = (log_s.exp() * (log_s - log_m)).sum(dim=1)
    kl_tm = (log_t.exp() * (log_t - log_m)).sum(dim=1)
    return (0.5 * (kl_sm + kl_tm)).mean()
