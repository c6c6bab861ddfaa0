"""Stage two: train a student (trainer) from a resolved TrainConfig (config), with its precision, evaluation, run log
and run folder.
"""

from kdcache.train.config import TrainConfig
from kdcache.train.configs import train_settings
from kdcache.train.evaluation import classification_metrics, evaluate
from kdcache.train.precision import Precision
from kdcache.train.runlog import RunLog, read_records
from kdcache.train.trainer import (
    TrainResult,
    build_objective,
    build_student,
    load_student,
    train_one_epoch,
    train_student,
)

__all__ = [
    "Precision",
    "RunLog",
    "TrainConfig",
    "TrainResult",
    "build_objective",
    "build_student",
    "classification_metrics",
    "evaluate",
    "load_student",
    "read_records",
    "train_one_epoch",
    "train_settings",
    "train_student",
]
