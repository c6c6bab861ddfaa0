"""kdcache: an offline teacher-logit cache for knowledge distillation.

Stage one (:func:`kdcache.dump_logits`) runs a teacher once over replayable augmented views and stores its logits in a
Zarr v3 group. Stage two (:func:`kdcache.train_student`) trains students from that cache with KD, DKD, MLKD, NKD,
NormKD, Sort, CTKD or a loss of your own (optionally Z-score standardized) without loading the teacher;
:class:`kdcache.DistillLoader` gives the same batches to a training loop of your own, and :func:`kdcache.write_report`
reports run folders (a sweep's, ``train-student``'s or an own loop's) as mean ± std over seeds.

Every public name is importable from ``kdcache`` itself; ``import kdcache`` stays light (torch is imported on the
first use of a name that needs it).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from kdcache.errors import KdcacheError

try:
    __version__ = version("kdcache")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

#: The public names of each stage subpackage, imported from it on first use.
_EXPORTS = {
    "kdcache.dataset": ("build_dataset", "test_split"),
    "kdcache.models": ("create_model", "list_models", "save_checkpoint", "load_checkpoint"),
    "kdcache.teacher": ("Teacher", "load_teacher"),
    "kdcache.store": (
        "open_store",
        "verify_cache",
        "inspect_cache",
        "TopKTeacher",
        "VerifyReport",
        "pull_cache",
        "derive_cache",
        "publish_cache",
        "write_manifest",
        "Manifest",
        "default_cache_dir",
        "use_cache_dir",
    ),
    "kdcache.dump": ("dump_logits", "dump_settings", "DumpSummary"),
    "kdcache.feed": ("DistillLoader", "Batch", "eval_loader", "init_ranks", "Ranks"),
    "kdcache.losses": (
        "register_loss",
        "get_loss",
        "Objective",
        "LOSS_REGISTRY",
        "LossSpec",
        "cross_entropy",
        "kd_loss",
        "dkd_loss",
        "mlkd_loss",
        "nkd_loss",
        "normkd_loss",
        "zscore",
    ),
    "kdcache.train": (
        "train_settings",
        "train_student",
        "train_settings",
        "TrainConfig",
        "TrainResult",
        "evaluate",
        "classification_metrics",
        "Precision",
        "train_one_epoch",
        "build_student",
        "build_objective",
        "load_student",
        "RunLog",
        "read_records",
    ),
    "kdcache.experiments": ("write_report", "Report", "run_sweep", "load_spec", "SweepResult", "study_views"),
}

#: Public names imported on first use, so ``import kdcache`` stays light (no torch until needed): name -> subpackage.
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # what mypy and IDEs see; at run time module __getattr__ imports these on first use
    from kdcache.dataset import build_dataset, test_split
    from kdcache.dump import DumpSummary, dump_logits, dump_settings
    from kdcache.experiments import Report, SweepResult, load_spec, run_sweep, study_views, write_report
    from kdcache.feed import Batch, DistillLoader, Ranks, eval_loader, init_ranks
    from kdcache.losses import (
        LOSS_REGISTRY,
        LossSpec,
        Objective,
        cross_entropy,
        dkd_loss,
        get_loss,
        kd_loss,
        mlkd_loss,
        nkd_loss,
        normkd_loss,
        register_loss,
        zscore,
    )
    from kdcache.models import create_model, list_models, load_checkpoint, save_checkpoint
    from kdcache.store import (
        Manifest,
        TopKTeacher,
        VerifyReport,
        default_cache_dir,
        derive_cache,
        inspect_cache,
        open_store,
        publish_cache,
        pull_cache,
        use_cache_dir,
        verify_cache,
        write_manifest,
    )
    from kdcache.teacher import Teacher, load_teacher
    from kdcache.train import (
        Precision,
        RunLog,
        TrainConfig,
        TrainResult,
        build_objective,
        build_student,
        classification_metrics,
        evaluate,
        load_student,
        read_records,
        train_one_epoch,
        train_settings,
        train_student,
    )


def __getattr__(name: str) -> object:
    """A public name, imported from its subpackage on first use (and kept in the module afterwards)."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's own names and every lazily imported public name."""
    return sorted({*globals(), *_LAZY})


#: Every public name (the same as ``_LAZY``, plus the two imported at once); a list for type checkers and IDEs.
__all__ = [
    "KdcacheError",
    "__version__",
    "build_dataset",
    "test_split",
    "create_model",
    "list_models",
    "save_checkpoint",
    "load_checkpoint",
    "Teacher",
    "load_teacher",
    "open_store",
    "verify_cache",
    "inspect_cache",
    "TopKTeacher",
    "VerifyReport",
    "pull_cache",
    "derive_cache",
    "publish_cache",
    "write_manifest",
    "Manifest",
    "default_cache_dir",
    "use_cache_dir",
    "dump_logits",
    "dump_settings",
    "DumpSummary",
    "DistillLoader",
    "Batch",
    "eval_loader",
    "init_ranks",
    "Ranks",
    "register_loss",
    "get_loss",
    "Objective",
    "LOSS_REGISTRY",
    "LossSpec",
    "cross_entropy",
    "kd_loss",
    "dkd_loss",
    "mlkd_loss",
    "nkd_loss",
    "normkd_loss",
    "zscore",
    "train_student",
    "train_settings",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "classification_metrics",
    "Precision",
    "train_one_epoch",
    "build_student",
    "build_objective",
    "load_student",
    "RunLog",
    "read_records",
    "write_report",
    "Report",
    "run_sweep",
    "load_spec",
    "SweepResult",
    "study_views",
]
