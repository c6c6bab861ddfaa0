"""kdcache: an offline teacher-logit cache for knowledge distillation.

Stage one (:func:`kdcache.dump.loop.dump_logits`) runs a teacher once over replayable
augmented views and stores its logits in a Zarr v3 group. Stage two
(:func:`kdcache.train.trainer.train_student`) trains students from that cache with KD,
DKD, MLKD, NKD, NormKD, Sort, CTKD or a loss of your own (optionally Z-score
standardized) without loading the teacher; :class:`kdcache.DistillLoader`
gives the same batches to a training loop of your own.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from kdcache.errors import KdcacheError

try:
    __version__ = version("kdcache")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

#: Public names imported on first use, so ``import kdcache`` stays light (no torch until needed).
_LAZY = {
    "DistillLoader": "kdcache.feed.batches",
    "Batch": "kdcache.feed.batches",
    "dump_logits": "kdcache.dump.loop",
    "train_student": "kdcache.train.trainer",
    "TrainConfig": "kdcache.train.trainer",
    "register_loss": "kdcache.losses.functions",
    "get_loss": "kdcache.losses.objective",
    "Objective": "kdcache.losses.objective",
    "create_model": "kdcache.models.zoo",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


__all__ = ["KdcacheError", "__version__", *_LAZY]
