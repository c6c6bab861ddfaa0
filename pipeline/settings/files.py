"""Settings files in kdcache's form: a flat YAML mapping of a command's flag names (``kd-weight: 9``).

Read with :func:`read_settings`, written with :func:`write_settings` (a run folder's ``config.yaml``), and combined
with what the user typed by :func:`resolve`, which is what the command line and the Python API both call. Every key
is checked against the settings table and every value read by its setting's reader; an old flag name still works and
says it is deprecated.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ParamSpec, TypeVar

import yaml

from kdcache.errors import KdcacheError, first_line
from kdcache.settings.table import REQUIRED, SETTINGS, Setting, command_settings
from kdcache.settings.values import READERS

#: Settings that say how to read the file or the command line, never a file key.
NOT_IN_FILES = ("config", "base_temp")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """The file's top-level mapping, or a one-line error for a missing, unreadable or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KdcacheError(f"config file {path} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KdcacheError(f"cannot read config file {path} ({first_line(exc)}): pass a UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise KdcacheError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise KdcacheError(f"{path}: the top level must be a mapping of flag: value lines, but it is {got}")
    return data


def is_yacs(data: Mapping) -> bool:
    """Whether a file's mapping is in the mdistiller (yacs) form: upper-case sections."""
    return any(isinstance(k, str) and k.isupper() for k in data)


def file_keys(command: str) -> dict[str, Setting]:
    """The keys a ``command`` file may hold, old flag names included, each with its setting."""
    keys = {}
    for s in command_settings(command):
        if s.name not in NOT_IN_FILES:
            keys[s.key] = s
            keys.update({alias.lstrip("-"): s for alias in s.uses[command].aliases})
    return keys


def renamed(old: str, new: str) -> None:
    """Say once, as a warning, that an old flag or key name was used."""
    warnings.warn(f"{old} is deprecated: use {new}", FutureWarning, stacklevel=3)


def read_value(setting: Setting, value: object, where: str) -> object:
    """``value`` read by its setting's reader; ``where`` starts the message of a refusal."""
    try:
        return READERS[setting.kind](value)
    except ValueError as exc:
        raise KdcacheError(f"{where}{setting.key} takes {exc}, got {value!r}") from None


def parse_settings(data: Mapping, command: str, path: str | Path) -> dict[str, object]:
    """Flag-named keys to Python names, each value checked and read for its setting (``path`` names the source)."""
    keys = file_keys(command)
    settings: dict[str, object] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in keys:
            raise KdcacheError(f"{path}: {_unknown_key(key, keys, command)}")
        if value is None:
            raise KdcacheError(f"{path}: {key} has no value: give one or delete the line")
        setting = keys[key]
        if key != setting.key:
            renamed(f"{key} (in {path})", setting.key)
        if setting.name in settings:
            raise KdcacheError(f"{path}: {setting.key} is given twice (as {key}): keep one")
        settings[setting.name] = read_value(setting, value, f"{path}: ")
    return settings


def _unknown_key(key: object, keys: dict[str, Setting], command: str) -> str:
    """Why ``key`` is refused, with the flag name the user probably meant."""
    if not isinstance(key, str):
        return f"key {key!r} is not a flag name: write {command} flag names such as epochs"
    dashed = key.lstrip("-").replace("_", "-")
    if dashed in keys:
        return f"write {dashed}, the flag name, not {key}"
    close = difflib.get_close_matches(dashed, list(keys), n=1)
    hint = f"did you mean {close[0]}?" if close else f"see `kdcache {command} --help` for the flags"
    return f"unknown key {key!r} for {command}: {hint}"


#: Reads a yacs-form file for a command that takes one (train-student), or None.
YacsReader = Callable[[dict, Path], dict[str, object]]


def read_settings(path: str | Path, command: str, yacs: YacsReader | None = None) -> dict[str, object]:
    """A settings file for ``command`` as ``{python_name: value}``; any bad key or value is refused by name."""
    path = Path(path)
    data = read_yaml(path)
    if not is_yacs(data):
        return parse_settings(data, command, path)
    if yacs is None:
        raise KdcacheError(
            f"{path} is an mdistiller config (upper-case sections), which describes a student run: "
            f"use it with train-student, not {command}"
        )
    lower = [k for k in data if not (isinstance(k, str) and k.isupper())]
    if lower:
        raise KdcacheError(f"{path} mixes mdistiller sections with kdcache keys ({lower[0]!r}): use one form per file")
    return yacs(data, path)


#: Kinds whose values arrive as text from the command line and as parsed values from Python or YAML.
COMPOSITE = ("ints", "epochs", "weights", "size", "paths", "plot")


def read_values(command: str, values: Mapping[str, object]) -> dict[str, object]:
    """``values`` with composite ones (milestones, weights, sizes, store lists) read by their setting's reader, so
    ``"150,180"`` and ``(150, 180)``, ``"4GiB"`` and ``4 << 30`` mean the same; a bad one is refused by its flag."""
    out = dict(values)
    for name, value in values.items():
        s = SETTINGS.get(name)
        single_path = s is not None and s.kind == "paths" and command in s.uses and not s.repeats(command)
        if s is not None and value is not None and s.kind in COMPOSITE and command in s.uses and not single_path:
            try:
                out[name] = READERS[s.kind](value)
            except ValueError as exc:
                raise KdcacheError(f"{s.flag} takes {exc}, got {value!r}") from None
    return out


def resolve(
    command: str,
    config: str | Path | None = None,
    given: Mapping[str, object] | None = None,
    yacs: YacsReader | None = None,
) -> dict[str, object]:
    """The settings a ``command`` run uses: the ``config`` file's, with ``given`` (what the user typed) on top.

    Settings that are neither given nor in the file are left out (the library applies its defaults); a required
    setting missing from both is refused naming its flag. ``yacs`` reads an mdistiller file (see
    :func:`read_settings`).
    """
    values = dict(read_settings(config, command, yacs) if config is not None else {})
    values.update(read_values(command, {k: v for k, v in (given or {}).items() if v is not None}))
    for s in command_settings(command):
        if s.uses[command].default is REQUIRED and values.get(s.name) in (None, (), []):
            raise KdcacheError(f"missing option {s.flag}: give it on the command line or in the --config file")
    return values


def write_settings(settings: Mapping[str, object], path: str | Path) -> Path:
    """Write ``settings`` (Python names) as a kdcache-form file that :func:`read_settings` reads back.

    Keys become flag names in sorted order; tuples become lists; ``None`` (a setting left to its default) is omitted.
    """
    path = Path(path)
    data = {name.replace("_", "-"): _plain(value) for name, value in sorted(settings.items()) if value is not None}
    try:
        text = yaml.safe_dump(data, sort_keys=True, default_flow_style=None)
    except yaml.YAMLError as exc:
        raise KdcacheError(f"cannot write these settings as YAML ({first_line(exc)}): pass plain values") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _plain(value: object) -> object:
    """A value as YAML writes it and :func:`read_settings` reads it back: tuples as lists, paths as text."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, Path) else value


P = ParamSpec("P")
R = TypeVar("R")


def old_names(**renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let a library function take the old keyword names of renamed settings (``seed`` for ``view_seed``), each
    with a deprecation warning."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise KdcacheError(f"{old} and {new} are the same setting: give {new} alone")
                    renamed(f"{fn.__name__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap
