"""kdcache: an offline teacher-logit cache for knowledge distillation.

Stage one (:func:`kdcache.dump.dump_logits`) runs a teacher once over replayable
augmented views and stores its logits in a Zarr v3 group. Stage two
(:func:`kdcache.train.train_student`) trains students from that cache with KD,
DKD and MLKD (optionally Z-score standardized) without loading the teacher.
"""

from importlib.metadata import PackageNotFoundError, version

from kdcache.errors import KdcacheError

try:
    __version__ = version("kdcache")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["KdcacheError", "__version__"]
