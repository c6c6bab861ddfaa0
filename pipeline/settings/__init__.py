"""Settings: one table of every command's settings (table), how values are read (values), the numeric rules
(rules) and settings files (files). The command line, config files and the Python API all read from here."""

from __future__ import annotations

from collections.abc import Mapping

from kdcache.errors import KdcacheError
from kdcache.settings.files import old_names, read_settings, read_values, renamed, resolve, write_settings
from kdcache.settings.rules import broken, shown
from kdcache.settings.table import (
    COMMANDS,
    DUMP_DEFAULTS,
    QUICKSTART_DEFAULTS,
    SETTINGS,
    STUDY_DEFAULTS,
    SWEEP_DEFAULTS,
    TRAIN_DEFAULTS,
    VERIFY_DEFAULTS,
    Setting,
    choices,
    command_settings,
)


def flag(name: str) -> str:
    """The command-line flag of a Python setting name: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_options(values: Mapping[str, object]) -> None:
    """Refuse the first value in ``values`` (Python setting names) that breaks its setting's rule or choices.

    Names the table does not know, and values of ``None`` (not given), are skipped. The messages are
    ``--flag RULE, got VALUE`` and ``unknown --flag VALUE: choose one of ...``, the same for every command.
    """
    for name, value in values.items():
        setting = SETTINGS.get(name)
        if setting is None or value is None:
            continue
        if setting.rule is not None and (words := broken(setting.rule, value)) is not None:
            raise KdcacheError(f"{setting.flag} {words}, got {shown(value)}")
        if setting.choices and value not in setting.choices:
            raise KdcacheError(f"unknown {setting.flag} {value!r}: choose one of {', '.join(setting.choices)}")


__all__ = [
    "COMMANDS",
    "DUMP_DEFAULTS",
    "QUICKSTART_DEFAULTS",
    "SETTINGS",
    "STUDY_DEFAULTS",
    "SWEEP_DEFAULTS",
    "TRAIN_DEFAULTS",
    "VERIFY_DEFAULTS",
    "Setting",
    "check_options",
    "choices",
    "command_settings",
    "flag",
    "old_names",
    "read_values",
    "read_settings",
    "renamed",
    "resolve",
    "write_settings",
]
