"""Click options built from the settings table: each command's flags, their help groups, and what the user typed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from kdcache.settings import SETTINGS, Setting, command_settings, renamed
from kdcache.settings.table import GROUPS, REQUIRED
from kdcache.settings.values import shown_size

F = TypeVar("F", bound=Callable[..., Any])
_ALIAS = "__alias__"


def _click_type(setting: Setting) -> Any:
    if setting.choices:
        return click.Choice(setting.choices)
    return {"int": click.INT, "float": click.FLOAT, "path": click.Path()}.get(setting.kind, click.STRING)


def _shown_default(setting: Setting, command: str) -> str | None:
    default = setting.uses[command].default
    if default is None or default is REQUIRED or setting.kind in ("bool", "plot"):
        return None
    if setting.kind == "size" and isinstance(default, int):
        return shown_size(default)
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default)
    return str(default)


def _help(setting: Setting, command: str) -> str:
    text = setting.help_for(command)
    return text + ("  [required]" if setting.uses[command].default is REQUIRED else "")


def _option(setting: Setting, command: str) -> Callable[[F], F]:
    kw: dict[str, Any] = {"help": _help(setting, command), "default": None, "multiple": setting.repeats(command)}
    if setting.kind == "bool":
        kw.update(is_flag=True, default=False)
    elif (shown := _shown_default(setting, command)) is not None:
        kw.update(type=_click_type(setting), default=shown, show_default=True)
    else:
        kw["type"] = _click_type(setting)
    if setting.optional_value is not None:
        kw.update(is_flag=False, flag_value=setting.optional_value)
    if setting.metavar:
        kw["metavar"] = setting.metavar
    if setting.repeats(command):
        kw["default"] = ()
    return click.option(setting.flag, setting.name, **kw)


def _alias(setting: Setting, alias: str, command: str) -> Callable[[F], F]:
    kw: dict[str, Any] = {"hidden": True, "default": None, "multiple": setting.repeats(command)}
    if setting.kind == "bool":
        kw.update(is_flag=True, default=False)
    else:
        kw["type"] = _click_type(setting)
    return click.option(alias, f"{setting.name}{_ALIAS}{alias.lstrip('-').replace('-', '_')}", **kw)


def settings_options(command: str, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """The click options of every setting ``command`` takes (old names as hidden aliases), in table order."""

    def decorate(fn: F) -> F:
        for setting in reversed(command_settings(command)):
            if setting.name in skip:
                continue
            for alias in setting.uses[command].aliases:
                fn = _alias(setting, alias, command)(fn)
            fn = _option(setting, command)(fn)
        return fn

    return decorate


def typed(kw: dict[str, Any]) -> dict[str, Any]:
    """The settings the user typed (not click's defaults), old flag names mapped to the new with a warning.

    ``kw`` loses its alias entries; the result holds only typed values, so a config file and the library's defaults
    fill in the rest.
    """
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    out: dict[str, Any] = {}
    for key in list(kw):
        if ctx.get_parameter_source(key) not in given:
            continue
        name, _, alias = key.partition(_ALIAS)
        if name in out:
            raise click.UsageError(
                f"{SETTINGS[name].flag} is given twice, under its old and its new name: give it once"
            )
        if alias:
            renamed("--" + alias.replace("_", "-"), SETTINGS[name].flag)
        out[name] = kw[key]
    for key in [k for k in kw if _ALIAS in k]:
        del kw[key]
    return out


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists its options under the settings table's groups."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            setting = SETTINGS.get(param.name or "")
            group = setting.group if setting is not None and isinstance(param, click.Option) else "Other"
            sections.setdefault(group, []).append(record)
        for group in sorted(sections, key=GROUPS.index):
            with formatter.section(f"{group} options"):
                formatter.write_dl(sections[group])
