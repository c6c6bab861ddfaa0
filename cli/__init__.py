"""The ``kdcache`` command line: a thin click shell over the library functions."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from kdcache import __version__
from kdcache.errors import KdcacheError


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


def _milestones(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("give comma-separated epochs such as 150,180,210") from None


_CONFIG = click.option(
    "--config",
    type=click.Path(),
    help="YAML settings: this command's flag names as keys (train-student also reads mdistiller/LS/MLKD configs). "
    "Flags on the command line override the file.",
)


def _typed(kw: dict) -> dict[str, object]:
    """The options the user typed (not click's defaults)."""
    ctx = click.get_current_context()
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in kw.items() if ctx.get_parameter_source(k) in typed}


def _with_config(command: str, kw: dict, required: tuple[str, ...]) -> dict:
    """Merge ``--config`` under the typed flags, then check the options that must come from one of them."""
    path = kw.pop("config")
    if path is not None:
        from kdcache.train.configs import load_config, merge

        kw = {**kw, **merge(load_config(path, command, set(kw)), _typed(kw))}
    missing = [name for name in required if kw.get(name) in (None, ())]
    if missing:
        flag = missing[0].replace("_", "-")
        raise KdcacheError(f"missing option --{flag}: give it on the command line or in the --config file")
    return kw


class _Main(click.Group):
    """The command group, with click's usage errors as one ``error:`` line (exit 2) like kdcache's own."""

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


@main.command("dump-logits")
@click.option("--teacher", help="Zoo name (resnet32x4, wrn_40_2, ...), torchvision.<arch> or timm.<name>.  [required]")
@click.option("--checkpoint", type=click.Path(), help="Teacher weights: {'model': state_dict} or a bare state dict.")
@click.option("--weights", help="torchvision weights name for torchvision.<arch> teachers (e.g. IMAGENET1K_V1).")
@click.option("--dataset", help="cifar100, imagenet, folder or digits (built in, offline).  [required]")
@click.option("--data-root", type=click.Path(), help="Dataset root (default data/).")
@click.option("--split", default="train", show_default=True, help="Dataset split to dump.")
@click.option("--augment", type=click.Choice(["none", "cifar", "imagenet", "mlkd"]), help="View recipe.  [required]")
@click.option("--views", help="Views per sample: N seeded views, or 'all' (the 162 CIFAR crop/flip views).  [required]")
@click.option(
    "--mix",
    default="none",
    show_default=True,
    type=click.Choice(["none", "mixup", "cutmix"]),
    help="Mix each view with a partner sample's view (partner, λ and box drawn per view and stored).",
)
@click.option("--mix-alpha", default=1.0, show_default=True, type=float, help="λ ~ Beta(alpha, alpha) for --mix.")
@click.option("--out", help="Store: a directory or any fsspec URL zarr accepts.  [required]")
@click.option("--seed", default=0, show_default=True, type=int, help="Cache seed the views are derived from.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Views per loader batch.")
@click.option(
    "--forward-block",
    default=64,
    show_default=True,
    type=int,
    help="Teacher runs in padded blocks of this many views, so logits do not depend on --batch-size.",
)
@click.option("--workers", default=0, show_default=True, type=int, help="DataLoader worker processes building views.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["none", "bf16", "fp16"]))
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option(
    "--format",
    "format",
    default="full",
    show_default=True,
    help="full logits, or topk:K (the K largest with their classes plus exact row statistics; kd/dkd only).",
)
@click.option("--download", is_flag=True, help="Download CIFAR-100 if it is missing (needs internet).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with different settings.")
@click.option("--scheduler", help="Run the chunks on an existing dask.distributed cluster (tcp://HOST:PORT).")
@click.option(
    "--local-cluster", type=int, help="Run the chunks on a new dask LocalCluster of N worker processes (one per GPU)."
)
@_CONFIG
@_errors
def dump_logits_cmd(**kw) -> None:
    """Stage one: run a teacher over replayable views and store its logits in a Zarr cache."""
    from kdcache.dump.loop import dump_logits

    kw = _with_config("dump-logits", kw, ("teacher", "dataset", "augment", "views", "out"))
    summary = dump_logits(**kw)
    click.echo("\n".join(summary.lines()))


@main.command("train-student")
@click.option(
    "--cache", multiple=True, help="A cache written by dump-logits; repeat it to distill from several teachers at once."
)
@click.option("--teacher-weights", help="Several caches: one mixing weight per --cache, e.g. 0.5,0.5 (default equal).")
@click.option(
    "--teacher-mix",
    default="logits",
    show_default=True,
    type=click.Choice(["logits", "probs"]),
    help="Several caches: average the logits, or the T=1 probabilities (used as log-probability logits).",
)
@click.option(
    "--teacher",
    help="Online teacher instead of a cache (zoo name, torchvision.<arch>, timm.<name>); with --cache, the teacher "
    "the cache must hold.",
)
@click.option("--checkpoint", type=click.Path(), help="Online teacher weights.")
@click.option("--weights", help="torchvision weights name for an online torchvision teacher (e.g. IMAGENET1K_V1).")
@click.option(
    "--augment", type=click.Choice(["none", "cifar", "imagenet", "mlkd"]), help="View recipe (online or CE runs)."
)
@click.option(
    "--mix", type=click.Choice(["none", "mixup", "cutmix"]), help="Online runs: mixed views, as dump-logits --mix."
)
@click.option("--mix-alpha", default=1.0, show_default=True, type=float, help="Online runs: λ ~ Beta(alpha, alpha).")
@click.option("--views", help="Views per sample for online runs: N or all.")
@click.option(
    "--view-seed", default=0, show_default=True, type=int, help="Online runs: the cache seed whose views to replay."
)
@click.option(
    "--forward-block", default=64, show_default=True, type=int, help="Online teacher block size (match the cache's)."
)
@click.option("--cache-views", type=int, help="Draw only from the first N views of a seeded cache.")
@click.option("--student", help="Student model name (`kdcache models`).  [required]")
@click.option("--dataset", help="cifar100, imagenet, folder or digits.  [required]")
@click.option("--data-root", type=click.Path())
@click.option("--download", is_flag=True)
@click.option(
    "--loss",
    default="kd",
    show_default=True,
    help="ce, kd, dkd, mlkd, nkd, normkd, normkd-dkd (`kdcache losses`), or your own package.module:function.",
)
@click.option(
    "--loss-opt",
    multiple=True,
    metavar="NAME=VALUE",
    help="A keyword option for a loss of your own (repeatable), e.g. --loss-opt margin=0.5.",
)
@click.option("--logit-stand", is_flag=True, help="Z-score standardize teacher and student logits (LS, CVPR 2024).")
@click.option("--temperature", type=float, help="Default 4 (2 with --logit-stand).")
@click.option("--ce-weight", type=float, help="Default 0.1 for kd/mlkd/normkd, 1 for dkd, normkd-dkd and ce.")
@click.option(
    "--kd-weight", type=float, help="Default 0.9 (9 with --logit-stand); dkd, normkd-dkd: 1, multiplies alpha and beta."
)
@click.option("--alpha", type=float, help="DKD / normkd-dkd target weight (default 1).")
@click.option("--beta", type=float, help="DKD / normkd-dkd non-target weight (default 8).")
@click.option("--warmup", type=int, help="DKD / normkd-dkd warm-up epochs (default 20; 0 for none).")
@click.option("--mlkd-variant", default="reference", show_default=True, type=click.Choice(["reference", "paper"]))
@click.option("--gamma", type=float, help="NKD non-target weight (default 1.5).")
@click.option("--t-norm", type=float, help="NormKD / normkd-dkd temperature factor (default 2).")
@click.option(
    "--teacher-fix",
    default="none",
    show_default=True,
    type=click.Choice(["none", "sort"]),
    help="sort: give the target class the teacher's largest logit (Sort), with any loss.",
)
@click.option("--ctkd", is_flag=True, help="Learn a global temperature adversarially (CTKD), with --loss kd or dkd.")
@click.option("--ctkd-t-start", default=1.0, show_default=True, type=float, help="CTKD: T = t_start + t_end·σ(θ).")
@click.option("--ctkd-t-end", default=20.0, show_default=True, type=float, help="CTKD: the range above t_start.")
@click.option(
    "--ctkd-decay",
    default="cosine",
    show_default=True,
    type=click.Choice(["cosine", "linear"]),
    help="CTKD λ schedule (upstream --cosine_decay 1 / 0).",
)
@click.option(
    "--ctkd-decay-epochs",
    default=10,
    show_default=True,
    type=int,
    help="CTKD λ schedule length in epochs (upstream --decay_loops; its ImageNet script uses 5).",
)
@click.option(
    "--ctkd-decay-max",
    default=0.0,
    show_default=True,
    type=float,
    help="Start of the CTKD λ schedule (upstream --decay_max).",
)
@click.option(
    "--ctkd-decay-min",
    default=-1.0,
    show_default=True,
    type=float,
    help="End of the cosine CTKD λ schedule (upstream --decay_min); linear steps by (max − min)/epochs.",
)
@click.option("--epochs", default=240, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", type=float, help="Default 0.05 (0.01 for MobileNetV2/ShuffleNet students; MLKD 0.025).")
@click.option("--lr-milestones", default="150,180,210", show_default=True, callback=_milestones)
@click.option("--lr-decay-rate", default=0.1, show_default=True, type=float, help="LR factor at each milestone.")
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Student init, sample order and per-epoch view draws."
)
@click.option(
    "--amp",
    default="none",
    show_default=True,
    type=click.Choice(["none", "bf16", "fp16"]),
    help="Student autocast dtype (the loss is computed in float32; fp16 adds a gradient scaler).",
)
@click.option("--channels-last", is_flag=True, help="Student weights and inputs in channels-last memory format.")
@click.option("--compile", is_flag=True, help="torch.compile the student's training forward pass.")
@click.option("--workers", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--out", type=click.Path(), help="Run directory (config.yaml, metrics.jsonl, last.pt, best.pt).  [required]"
)
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--verify-views", is_flag=True, help="Check the pixel hash of every view, not a sample of batches.")
@click.option("--plot", is_flag=True, help="Write RUN_DIR/curves.png.")
@click.option(
    "--view-schedule",
    type=click.Choice(["chunk", "sample"]),
    help="Seeded caches: one view per store chunk per epoch (reads one view's worth; default for new runs), or one "
    "per sample. --resume continues the run's own.",
)
@click.option(
    "--cache-memory",
    default="4GiB",
    show_default=True,
    help="Keep a cache whole in RAM up to this size (512MiB, 4GiB, ...); above it each epoch streams one view's worth.",
)
@click.option(
    "--cache-scratch",
    type=click.Path(),
    help="A local folder where the cache is kept decompressed and memory-mapped: students of one cache on this "
    "machine share one copy.",
)
@click.option(
    "--base-temp",
    type=float,
    help="With an mdistiller/LS --config and --logit-stand: LS's train.py --base-temp (default 2), as there.",
)
@_CONFIG
@_errors
def train_student_cmd(**kw) -> None:
    """Stage two: train a student from cached logits (or an online teacher, or CE alone)."""
    from kdcache.sizes import parse_size
    from kdcache.train.trainer import train_student

    kw = _ls_arguments(kw)
    kw = _with_config("train-student", kw, ("student", "dataset", "out"))
    kw["cache"] = list(kw["cache"] or ()) or None
    kw["cache_memory"] = parse_size(kw["cache_memory"])
    result = train_student(**kw)
    if result.main:
        last = result.last.get("test_top1", float("nan"))
        click.echo(
            f"last-epoch test top-1 {last:.2f}% (epoch {result.last.get('epoch', '-')})  "
            f"best-epoch test top-1 {result.best_top1:.2f}% (epoch {result.best_epoch or '-'})  -> {result.out}"
        )


def _ls_arguments(kw: dict) -> dict:
    """An mdistiller/LS ``--config`` with ``--logit-stand``: ``--base-temp`` and ``--kd-weight`` act as LS's train.py.

    Otherwise ``--base-temp`` has no meaning (use ``--temperature``) and the flags keep kdcache's meaning.
    """
    from kdcache.train.configs import apply_ls_args, is_mdistiller_file, load_config

    base_temp = kw.pop("base_temp")
    if kw["config"] is None or not is_mdistiller_file(kw["config"]):
        if base_temp is not None:
            raise KdcacheError("--base-temp goes with an mdistiller/LS --config (as LS's train.py): use --temperature")
        return kw
    typed = _typed(kw)
    if "logit_stand" not in typed:
        if base_temp is not None:
            raise KdcacheError("--base-temp takes effect only with --logit-stand (as LS's train.py): add it or drop it")
        return kw
    settings = load_config(kw.pop("config"), "train-student", set(kw))
    settings = apply_ls_args(settings, True, base_temp, typed.pop("kd_weight", None))
    return {**kw, **settings, **{k: v for k, v in typed.items() if k != "logit_stand"}, "config": None}


@main.command("losses")
def losses_cmd() -> None:
    """List the built-in losses (--loss) with their defaults, and what each works with."""
    from kdcache.losses.registry import LOSS_REGISTRY

    for spec in LOSS_REGISTRY.values():
        ls = f"\n{'':<11} with --logit-stand: {_options(spec.ls_defaults)}" if spec.ls_defaults else ""
        works = [w for w, ok in (("top-K caches", spec.topk), ("mixed views", spec.mixed), ("--ctkd", spec.ctkd)) if ok]
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


@main.command("inspect")
@click.argument("stores", nargs=-1, required=True)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(),
    help="Write per-view teacher accuracy and confidence (or agreement) as PNG.",
)
@_errors
def inspect_cmd(stores: tuple[str, ...], plot_path: str | None) -> None:
    """Show a cache's attributes, completion, size and per-view teacher accuracy.

    Given several caches of the same views (one per teacher), also show how the
    teachers agree per view.
    """
    from kdcache.store.cache import check_output_dir
    from kdcache.store.inspection import inspect_cache, teacher_agreement

    if plot_path:
        check_output_dir(Path(plot_path).absolute().parent, "--plot folder")
    for store in stores:
        report = inspect_cache(store)
        click.echo("\n".join(report.lines()))
    if len(stores) > 1:
        agreement = teacher_agreement(list(stores))
        click.echo("\n".join(agreement.lines()))
        if plot_path:
            from kdcache.plots import plot_agreement

            click.echo(f"plot       {plot_agreement(agreement.top1, agreement.agree, plot_path)}")
        return
    if plot_path:
        if not report.top1:
            raise KdcacheError("no finished view to plot yet: finish the dump first")
        from kdcache.plots import plot_views

        click.echo(f"plot       {plot_views(report.top1, report.confidence, plot_path)}")


@main.command("verify")
@click.argument("store")
@click.option("--teacher", help="Re-run this teacher on --sample random views and compare.")
@click.option("--checkpoint", type=click.Path())
@click.option("--weights")
@click.option("--sample", default=0, show_default=True, type=int, help="Views to rebuild and re-run (needs --teacher).")
@click.option("--data-root", type=click.Path(), help="Where the cache's dataset lives (for --sample).")
@click.option("--device", default="auto", show_default=True)
@_errors
def verify_cmd(store: str, teacher, checkpoint, weights, sample: int, data_root, device: str) -> None:
    """Check completeness, checksums, attributes and finiteness; exit 0 clean, 1 with problems listed."""
    from kdcache.store.verify import verify_cache

    report = verify_cache(store, teacher, checkpoint, weights, sample, data_root, device)
    for line in report.checked:
        click.echo(f"checked   {line}")
    for line in report.problems:
        click.echo(f"PROBLEM   {line}")
    click.echo("clean" if report.ok else f"{len(report.problems)} problem(s) found")
    sys.exit(0 if report.ok else 1)


@main.group("study")
def study_group() -> None:
    """Studies that answer questions before you pay for a dump."""


@study_group.command("views")
@click.option("--cache", required=True, help="A cache of seeded views (dump-logits --views N).")
@click.option("--student", required=True, help="Student model name.")
@click.option("--dataset", required=True, help="The cache's dataset.")
@click.option("--data-root", type=click.Path())
@click.option("--teacher", help="Online teacher for the reference line (the cache's teacher).")
@click.option("--checkpoint", type=click.Path(), help="Online teacher weights.")
@click.option("--weights", help="torchvision weights name for an online torchvision teacher.")
@click.option("--counts", help="Views to train from, e.g. 1,2,4,8 (default: powers of two up to the cache's views).")
@click.option(
    "--loss", default="kd", show_default=True, type=click.Choice(["kd", "dkd", "nkd", "normkd", "normkd-dkd"])
)
@click.option("--logit-stand", is_flag=True)
@click.option("--epochs", default=240, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", type=float)
@click.option("--lr-milestones", default="150,180,210", show_default=True, callback=_milestones)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Study folder: one run per point, study.json, views.png.")
@_errors
def study_views_cmd(counts: str | None, **kw) -> None:
    """Train the same student from the first 1, 2, 4, ... cached views and plot accuracy against views."""
    from kdcache.experiments.study import study_views

    try:
        parsed = [int(x) for x in counts.split(",")] if counts else None
    except ValueError:
        raise KdcacheError(f"--counts takes comma-separated integers such as 1,2,4,8, not {counts!r}") from None
    points = study_views(counts=parsed, **kw)
    for p in points:
        label = "online" if p.views is None else f"{p.views} view(s)"
        accuracy = f"last-epoch test top-1 {p.final_top1:6.2f}%  best-epoch test top-1 {p.best_top1:6.2f}%"
        click.echo(f"{label:>12}  {accuracy}  {p.run}")
    click.echo(f"plot         {Path(kw['out']) / 'views.png'}")


@main.command("quickstart")
@click.option(
    "--out", default="data/quickstart", show_default=True, type=click.Path(), help="Where runs, caches and results go."
)
@click.option(
    "--epochs", default=6, show_default=True, type=int, help="Student epochs (the teacher trains a third longer)."
)
@click.option("--parallel", default=2, show_default=True, type=int, help="Students at once (one CPU thread each).")
@_errors
def quickstart_cmd(out: str, epochs: int, parallel: int) -> None:
    """Run the whole pipeline offline on the built-in digits data and compare KD methods over 3 seeds."""
    from kdcache.experiments.quickstart import quickstart
    from kdcache.settings import check_options

    check_options({"epochs": epochs})
    quickstart(out, epochs, teacher_epochs=max(2, round(4 * epochs / 3)), parallel=parallel)


@main.command("sweep")
@click.argument("spec", required=False, type=click.Path())
@click.option("--preset", help="A SPEC shipped with kdcache instead of SPEC (ls-cifar100).")
@click.option("--out", required=True, type=click.Path(), help="Sweep folder: runs/, caches/, summary.csv, results.md.")
@click.option("--parallel", default=1, show_default=True, type=int, help="Students at once on this machine.")
@click.option("--per-gpu", default=1, show_default=True, type=int, help="Students sharing one GPU.")
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=int,
    help="CPU threads per student, whatever --parallel is (CPU results depend on it, so keep it to compare sweeps).",
)
@click.option("--local-cluster", type=int, help="Run each student as a task on a new dask LocalCluster of N workers.")
@click.option("--scheduler", help="Run each student as a task on an existing dask.distributed cluster (tcp://...).")
@click.option("--report", "report_only", is_flag=True, help="Only rebuild the report from the runs finished so far.")
@_errors
def sweep_cmd(spec: str | None, preset: str | None, out: str, report_only: bool, **kw) -> None:
    """Many students from one cache: a SPEC's methods x grid x seeds, run side by side, reported as mean ± std."""
    from kdcache.experiments.report import write_report
    from kdcache.experiments.sweep import load_spec, preset_path, run_sweep

    if report_only:
        report = write_report(out)
        click.echo("\n".join(f"report     {p}" for p in report.paths))
        return
    if (spec is None) == (preset is None):
        raise KdcacheError("give a SPEC.yaml or --preset NAME (one of them)")
    result = run_sweep(load_spec(spec or preset_path(preset)), out, **kw)
    click.echo(
        f"results    {Path(out) / 'results.md'}  ({len(result.runs) - len(result.failed)} of {len(result.runs)} runs)"
    )
    if result.failed:
        for name, line in result.failed.items():
            click.echo(f"FAILED     {name}: {line}", err=True)
        sys.exit(1)


@main.command("models")
@click.option("--torchvision", "with_tv", is_flag=True, help="Also list torchvision.<arch> names.")
@click.option("--timm", "with_timm", is_flag=True, help="Also list timm.<name> names (needs kdcache[timm]).")
@_errors
def models_cmd(with_tv: bool, with_timm: bool) -> None:
    """List model names for --teacher and --student."""
    from kdcache.models.factory import list_models

    click.echo("\n".join(list_models(include_torchvision=with_tv, include_timm=with_timm)))


if __name__ == "__main__":
    main()
