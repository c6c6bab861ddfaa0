"""Many students from one cache: sweeps (sweep), their mean ± std report (report), the views study (study) and the
offline quickstart.
"""

from kdcache.experiments.report import Report, write_report
from kdcache.experiments.study import study_views
from kdcache.experiments.sweep import SweepResult, load_spec, run_sweep, sweep_command

__all__ = ["Report", "SweepResult", "load_spec", "run_sweep", "study_views", "sweep_command", "write_report"]
