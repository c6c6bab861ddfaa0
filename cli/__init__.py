"""The ``kdcache`` command line: a thin click shell over the library functions."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from kdcache import __version__
from kdcache.cli.options import GroupedCommand, settings_options, typed
from kdcache.errors import KdcacheError
from kdcache.settings.table import (
    DERIVE,
    DUMP,
    INSPECT,
    MODELS,
    PUBLISH,
    PULL,
    QUICKSTART,
    STUDY,
    SWEEP,
    TRAIN,
    VERIFY,
)


def _errors(fn: Callable) -> Callable:
    """Turn a KdcacheError into one ``error:`` line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


class _Main(click.Group):
    """The command group, with click's usage errors as one ``error:`` line (exit 2) like kdcache's own."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One whole line per command (click cuts each description at 45 characters)."""
        rows = [(name, self.commands[name].get_short_help_str(limit=200)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, h in rows if not self.commands[n].hidden])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click prints it
                click.echo(exc.ctx.get_help())
                sys.exit(0)
            where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "kdcache --help"
            click.echo(f"error: {exc.format_message()} (see `{where}`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdcache")
def main() -> None:
    """kdcache: pay the teacher's forward pass once, train many students from its cached logits."""
    warnings.showwarning = _warning_line


def _warning_line(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """A warning as one ``warning:`` line on stderr, without Python's source line."""
    click.echo(f"warning: {message}", err=True)


@main.command("dump-logits", cls=GroupedCommand)
@settings_options(DUMP)
@_errors
def dump_logits_cmd(**kw) -> None:
    """Stage one: run a teacher over replayable views and store its logits in a Zarr cache."""
    from kdcache.dump import dump_logits, dump_settings

    settings: Mapping[str, Any] = dump_settings(**typed(kw))  # mixed settings, each checked by dump_logits
    summary = dump_logits(**settings)
    click.echo("\n".join(summary.lines()))


@main.command("train-student", cls=GroupedCommand)
@settings_options(TRAIN)
@_errors
def train_student_cmd(**kw) -> None:
    """Stage two: train a student from cached logits (or an online teacher, or CE alone)."""
    from kdcache.store import use_cache_dir
    from kdcache.train import train_settings, train_student

    settings: dict[str, Any] = train_settings(**typed(kw))  # mixed settings, each checked by train_student
    with use_cache_dir(settings.pop("cache_dir", None)):  # where reads of a remote --cache keep what they fetch
        result = train_student(**settings)
    if result.main:
        last = result.last.get("test_top1", float("nan"))
        click.echo(
            f"last-epoch test top-1 {last:.2f}% (epoch {result.last.get('epoch', '-')})  "
            f"best-epoch test top-1 {result.best_top1:.2f}% (epoch {result.best_epoch or '-'})  -> {result.out}"
        )


@main.command("losses")
def losses_cmd() -> None:
    """List the built-in losses (--loss) with their defaults, and what each works with."""
    from kdcache.losses.registry import LOSS_REGISTRY

    for spec in LOSS_REGISTRY.values():
        ls = f"\n{'':<11} with --logit-stand: {_options(spec.ls_defaults)}" if spec.ls_defaults else ""
        works = [
            w for w, ok in (("top-K caches", spec.topk), ("mixed views", spec.mixed), ("--ctkd", spec.with_ctkd)) if ok
        ]
        click.echo(f"{spec.name:<11} {spec.summary}")
        click.echo(f"{'':<11} defaults: {_options(spec.defaults)}{ls}")
        extra = (["weak+strong views (--augment mlkd)"] if spec.kinds == 2 else []) + works
        if extra:
            click.echo(f"{'':<11} works with: {', '.join(extra)}")
    click.echo("your own: --loss package.module:function (student, teacher, labels, **options) with --loss-opt k=v")


def _options(values: dict) -> str:
    """``--flag value`` pairs as a user types them."""
    shown = {k.replace("_", "-"): v for k, v in values.items() if not isinstance(v, bool)}
    return ", ".join(f"--{k} {v}" for k, v in shown.items())


@main.command("inspect", cls=GroupedCommand)
@click.argument("caches", nargs=-1, required=True, metavar="CACHE...")
@settings_options(INSPECT)
@_errors
def inspect_cmd(caches: tuple[str, ...], plot: str | None, cache_dir: str | None) -> None:
    """Show a cache's attributes, completion, size, per-view teacher accuracy, manifest and card.

    A remote cache (http(s)://, s3://, hf://) is shown from its metadata alone, before any chunk is read. Given
    several caches of the same views (one per teacher), also show how the teachers agree per view.
    """
    from kdcache.store import inspect_caches

    for line in inspect_caches(list(caches), plot, cache_dir):
        click.echo(line)


@main.command("verify", cls=GroupedCommand)
@click.argument("cache", metavar="CACHE")
@settings_options(VERIFY)
@_errors
def verify_cmd(cache: str, **kw) -> None:
    """Check completeness, checksums, attributes and finiteness; exit 0 clean, 1 with problems listed."""
    from kdcache.store import verify_cache

    report = verify_cache(cache, **typed(kw))
    for line in report.checked:
        click.echo(f"checked   {line}")
    for line in report.problems:
        click.echo(f"PROBLEM   {line}")
    click.echo("clean" if report.ok else f"{len(report.problems)} problem(s) found")
    sys.exit(0 if report.ok else 1)


@main.group("study")
def study_group() -> None:
    """Studies that answer questions before you pay for a dump."""


@study_group.command("views", cls=GroupedCommand)
@settings_options(STUDY)
@_errors
def study_views_cmd(**kw) -> None:
    """Train the same student from the first 1, 2, 4, ... cached views and plot accuracy against views."""
    from kdcache.experiments import study_views
    from kdcache.settings import resolve
    from kdcache.store import use_cache_dir

    settings: dict[str, Any] = resolve(STUDY, None, typed(kw))  # mixed settings, each checked by study_views
    with use_cache_dir(settings.pop("cache_dir", None)):
        points = study_views(**settings)
    for p in points:
        label = "online" if p.views is None else f"{p.views} view(s)"
        accuracy = f"last-epoch test top-1 {p.final_top1:6.2f}%  best-epoch test top-1 {p.best_top1:6.2f}%"
        click.echo(f"{label:>12}  {accuracy}  {p.run}")
    click.echo(f"plot         {Path(str(settings['out'])) / 'views.png'}")


@main.command("quickstart", cls=GroupedCommand)
@settings_options(QUICKSTART)
@_errors
def quickstart_cmd(**kw) -> None:
    """Run the whole pipeline offline on the built-in digits data and compare KD methods over 3 seeds."""
    from kdcache.experiments.quickstart import quickstart

    quickstart(**typed(kw))


@main.command("sweep", cls=GroupedCommand)
@click.argument("spec", required=False, type=click.Path())
@settings_options(SWEEP)
@_errors
def sweep_cmd(spec: str | None, **kw) -> None:
    """Many students from one cache: a SPEC's methods x grid x seeds, run side by side, reported as mean ± std."""
    from kdcache.experiments import sweep_command
    from kdcache.store import use_cache_dir

    given = typed(kw)
    with use_cache_dir(given.pop("cache_dir", None)):  # the students' too: they inherit the environment
        lines, failed = sweep_command(spec, **given)
    for line in lines:
        click.echo(line)
    for line in failed:
        click.echo(f"FAILED     {line}", err=True)
    if failed:
        sys.exit(1)


@main.command("pull", cls=GroupedCommand)
@click.argument("url", metavar="URL")
@click.argument("directory", metavar="DIR")
@settings_options(PULL)
@_errors
def pull_cmd(url: str, directory: str, **kw) -> None:
    """Copy the cache at URL (or some of its views) into the folder DIR, every file checked against its manifest.

    An interrupted pull goes on from where it stopped; a corrupt or short file is fetched again.
    """
    from kdcache.store import pull_cache

    click.echo("\n".join(pull_cache(url, directory, **typed(kw)).lines()))


@main.command("derive", cls=GroupedCommand)
@click.argument("store", metavar="STORE")
@click.argument("out", metavar="OUT")
@settings_options(DERIVE)
@_errors
def derive_cmd(store: str, out: str, **kw) -> None:
    """A smaller cache OUT from the finished cache STORE (fewer views, top-k, float16), without the teacher."""
    from kdcache.store import derive_cache

    click.echo("\n".join(derive_cache(store, out, **typed(kw)).lines()))


@main.command("publish", cls=GroupedCommand)
@click.argument("store", metavar="STORE")
@click.argument("out", metavar="OUT")
@settings_options(PUBLISH)
@_errors
def publish_cmd(store: str, out: str, **kw) -> None:
    """Copy the finished cache STORE into OUT with its manifest and a cache card (README.md), ready to serve.

    OUT the same as STORE writes the manifest and card in place.
    """
    from kdcache.store import publish_cache

    click.echo("\n".join(publish_cache(store, out, **typed(kw)).lines()))


@main.command("models", cls=GroupedCommand)
@settings_options(MODELS)
@_errors
def models_cmd(**kw) -> None:
    """List model names for --teacher and --student."""
    from kdcache.models import list_models

    given = typed(kw)
    click.echo("\n".join(list_models(given.get("torchvision", False), given.get("timm", False))))


if __name__ == "__main__":
    main()
