"""Every setting of every command, once: its kind, default, choices, rule, help, help group and the commands taking it.

The command line's options (and their ``--help`` groups), the keys a config file may hold and how their values are
read, the numeric rules, the defaults of ``train_student``, ``TrainConfig``, ``DistillLoader``, ``dump_logits`` and
the other library functions, and the settings table in docs/settings.md all come from :data:`SETTINGS`. A default
of ``None`` means "not given": the library fills it in (a loss's defaults come from the loss registry alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdcache.settings import rules
from kdcache.settings.rules import Rule

DUMP, TRAIN, STUDY, VERIFY, INSPECT = "dump-logits", "train-student", "study views", "verify", "inspect"
QUICKSTART, SWEEP, MODELS = "quickstart", "sweep", "models"
PULL, DERIVE, PUBLISH = "pull", "derive", "publish"
COMMANDS = (DUMP, TRAIN, STUDY, VERIFY, INSPECT, QUICKSTART, SWEEP, MODELS, PULL, DERIVE, PUBLISH)
#: Help sections, in the order ``--help`` shows them.
GROUPS = ("Data", "Teacher", "Views", "Cache", "Loss", "Optimization", "Compute", "Output", "Cluster", "Other")

#: The value marking a setting a command must be given.
REQUIRED = object()


@dataclass(frozen=True)
class Use:
    """How one command takes a setting: its default (or :data:`REQUIRED`), and help or aliases of its own."""

    default: object = None
    help: str | None = None
    aliases: tuple[str, ...] = ()
    multiple: bool | None = None  # None: as the setting says


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` is the Python name, the flag is ``--name-with-dashes`` and the config key ``name-with-
    dashes``; ``kind`` names its reader in :data:`kdcache.settings.values.READERS`."""

    name: str
    kind: str
    help: str
    group: str
    uses: Mapping[str, Use]
    choices: tuple[str, ...] = ()
    rule: Rule | None = None
    flag_only: bool = False  # a switch: --name sets it, there is no value to give
    multiple: bool = False  # repeat the flag for several values
    metavar: str | None = None
    optional_value: str | None = None  # the value a flag given alone takes (``--plot`` = its default place)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The config-file key (the flag without its dashes)."""
        return self.name.replace("_", "-")

    def default(self, command: str) -> Any:
        """The default ``command`` uses (None when it has none or the setting is required)."""
        use = self.uses[command]
        return None if use.default is REQUIRED else use.default

    def help_for(self, command: str) -> str:
        return self.uses[command].help or self.help

    def repeats(self, command: str) -> bool:
        """Whether ``command`` takes the flag several times."""
        own = self.uses[command].multiple
        return self.multiple if own is None else own


def _all(default: object = None, *commands: str) -> dict[str, Use]:
    return {c: Use(default) for c in commands}


RECIPES = ("none", "cifar", "imagenet", "mlkd")
MIXES = ("none", "mixup", "cutmix")
AMP_MODES = ("none", "bf16", "fp16")
DTYPES = ("float16", "float32")
TEACHER_MIXES = ("logits", "probs")
MLKD_VARIANTS = ("reference", "paper")
TEACHER_FIXES = ("none", "sort")
CTKD_DECAYS = ("cosine", "linear")
SCHEDULES = ("chunk", "sample")
KINDS = ("weak", "strong", "both")
_KEEP_VIEWS = "Views to keep: A:B (view A up to B, B left out; default every view)."
_ONLINE = "Online runs: "
_LOSS_DEFAULT = " Default: the loss's (`kdcache losses`)."

_DATA = [
    Setting(
        "dataset",
        "text",
        "cifar100, imagenet, folder (an ImageNet-style folder) or digits (built in, offline).",
        "Data",
        {DUMP: Use(REQUIRED), TRAIN: Use(REQUIRED), STUDY: Use(REQUIRED, "The cache's dataset.")},
    ),
    Setting(
        "data_root", "path", "Dataset root (default: data/).", "Data", _all(None, DUMP, TRAIN, STUDY, VERIFY, PUBLISH)
    ),
    Setting(
        "download", "bool", "Download CIFAR-100 if it is missing (needs internet).", "Data", _all(False, DUMP, TRAIN)
    ),
    Setting("split", "text", "Dataset split to dump (train, test or val).", "Data", _all("train", DUMP)),
]
_TEACHER = [
    Setting(
        "teacher",
        "text",
        "Zoo name (resnet32x4, wrn_40_2, ...), torchvision.<arch> or timm.<name>.",
        "Teacher",
        {
            DUMP: Use(REQUIRED),
            TRAIN: Use(
                None,
                "Online teacher instead of a cache (zoo name, torchvision.<arch>, timm.<name>); with "
                "--cache, the teacher the cache must hold.",
            ),
            STUDY: Use(None, "Online teacher for the reference line (the cache's teacher)."),
            VERIFY: Use(None, "Re-run this teacher on --sample random views and compare."),
        },
    ),
    Setting(
        "checkpoint",
        "path",
        "Teacher weights: {'model': state_dict} or a bare state dict.",
        "Teacher",
        {
            **_all(None, DUMP, TRAIN, STUDY, VERIFY),
            PUBLISH: Use(None, "The cache's teacher checkpoint: measure its test top-1 for the card (sha256 checked)."),
        },
    ),
    Setting(
        "weights",
        "text",
        "torchvision weights name for a torchvision.<arch> teacher (e.g. IMAGENET1K_V1).",
        "Teacher",
        _all(None, DUMP, TRAIN, STUDY, VERIFY),
    ),
    Setting(
        "forward_block",
        "int",
        "Teacher runs in padded blocks of this many views, so logits do not depend on --batch-size.",
        "Teacher",
        {DUMP: Use(64), TRAIN: Use(64, _ONLINE + "teacher block size (match the cache's).")},
        rule=rules.INT_AT_LEAST_1,
    ),
]
_VIEWS = [
    Setting(
        "augment",
        "text",
        "View recipe.",
        "Views",
        {DUMP: Use(REQUIRED), TRAIN: Use(None, "View recipe (online or CE runs).")},
        choices=RECIPES,
    ),
    Setting(
        "views",
        "views",
        "Views per sample: N seeded views, or 'all' (the 162 CIFAR crop/flip views).",
        "Views",
        {
            DUMP: Use(REQUIRED),
            TRAIN: Use(None, _ONLINE + "views per sample, N or all."),
            PULL: Use(None, _KEEP_VIEWS),
            DERIVE: Use(None, _KEEP_VIEWS),
        },
    ),
    Setting(
        "view_seed",
        "int",
        "Cache seed the views are derived from.",
        "Views",
        {DUMP: Use(0, aliases=("--seed",)), TRAIN: Use(0, _ONLINE + "the cache seed whose views to replay.")},
        rule=rules.SEED,
    ),
    Setting(
        "mix",
        "text",
        "Mix each view with a partner sample's view (partner, λ and box drawn per view and stored).",
        "Views",
        {DUMP: Use("none"), TRAIN: Use(None, _ONLINE + "mixed views, as dump-logits --mix.")},
        choices=MIXES,
    ),
    Setting(
        "mix_alpha", "float", "λ ~ Beta(alpha, alpha) for --mix.", "Views", _all(1.0, DUMP, TRAIN), rule=rules.POSITIVE
    ),
]
_CACHE = [
    Setting(
        "cache",
        "paths",
        "A cache written by dump-logits; repeat it to distill from several teachers at once.",
        "Cache",
        {TRAIN: Use(None), STUDY: Use(REQUIRED, "A cache of seeded views (dump-logits --views N).", multiple=False)},
        multiple=True,
        metavar="CACHE",
    ),
    Setting(
        "cache_weights",
        "weights",
        "Several caches: one mixing weight per --cache, e.g. 0.5,0.5 (default equal).",
        "Cache",
        {TRAIN: Use(None, aliases=("--teacher-weights",))},
    ),
    Setting(
        "teacher_mix",
        "text",
        "Several caches: average the logits, or the T=1 probabilities (used as log-probability logits).",
        "Cache",
        _all("logits", TRAIN),
        choices=TEACHER_MIXES,
    ),
    Setting(
        "cache_views",
        "int",
        "Draw only from the first N views of a seeded cache.",
        "Cache",
        _all(None, TRAIN),
        rule=rules.INT_AT_LEAST_1,
    ),
    Setting(
        "view_schedule",
        "text",
        "Seeded caches: one view per store chunk per epoch (reads one view's worth; default for new runs), or one "
        "per sample. --resume continues the run's own.",
        "Cache",
        _all(None, TRAIN),
        choices=SCHEDULES,
    ),
    Setting(
        "cache_memory",
        "size",
        "Keep a cache whole in RAM up to this size (512MiB, 4GiB, ...); above it each epoch streams one view's worth.",
        "Cache",
        _all(4 << 30, TRAIN),
        rule=rules.SIZE,
    ),
    Setting(
        "cache_scratch",
        "path",
        "A local folder where the cache is kept decompressed and memory-mapped: students of one cache on this "
        "machine share one copy.",
        "Cache",
        _all(None, TRAIN),
    ),
    Setting(
        "verify_views",
        "bool",
        "Check the pixel hash of every view, not a sample of batches.",
        "Cache",
        _all(False, TRAIN),
    ),
    Setting(
        "format",
        "text",
        "full logits, or topk:K (the K largest with their classes plus exact row statistics; kd/dkd only).",
        "Cache",
        {DUMP: Use("full"), DERIVE: Use(None, "topk:K: keep the K largest logits, statistics from the full rows.")},
    ),
    Setting(
        "dtype",
        "text",
        "Logit dtype in the store.",
        "Cache",
        {DUMP: Use("float16"), DERIVE: Use(None, "Logit dtype of the derived cache (default: the source's).")},
        choices=DTYPES,
    ),
    Setting("overwrite", "bool", "Replace an existing cache made with different settings.", "Cache", _all(False, DUMP)),
    Setting(
        "sample",
        "int",
        "Views to rebuild and re-run (needs --teacher).",
        "Cache",
        _all(0, VERIFY),
        rule=rules.INT_AT_LEAST_0,
    ),
]
_LOSS = [
    Setting(
        "loss",
        "text",
        "ce, kd, dkd, mlkd, nkd, normkd, normkd-dkd (`kdcache losses`), or your own package.module:function.",
        "Loss",
        _all("kd", TRAIN, STUDY),
    ),
    Setting(
        "loss_opt",
        "mapping",
        "A keyword option for a loss of your own (repeatable), e.g. --loss-opt margin=0.5.",
        "Loss",
        _all(None, TRAIN, STUDY),
        multiple=True,
        metavar="NAME=VALUE",
    ),
    Setting(
        "logit_stand",
        "bool",
        "Z-score standardize teacher and student logits (LS, CVPR 2024).",
        "Loss",
        _all(False, TRAIN, STUDY),
    ),
    Setting(
        "temperature",
        "float",
        "Softmax temperature." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.POSITIVE,
    ),
    Setting(
        "ce_weight",
        "float",
        "Weight of the cross-entropy term." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.AT_LEAST_0,
    ),
    Setting(
        "kd_weight",
        "float",
        "Weight of the distillation term (dkd: multiplies alpha and beta)." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.AT_LEAST_0,
    ),
    Setting(
        "alpha",
        "float",
        "DKD target-class weight." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.AT_LEAST_0,
    ),
    Setting(
        "beta",
        "float",
        "DKD non-target weight." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.AT_LEAST_0,
    ),
    Setting(
        "warmup",
        "int",
        "DKD warm-up epochs (0 for none)." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.INT_AT_LEAST_0,
    ),
    Setting(
        "gamma",
        "float",
        "NKD non-target weight." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.AT_LEAST_0,
    ),
    Setting(
        "t_norm",
        "float",
        "NormKD temperature factor." + _LOSS_DEFAULT,
        "Loss",
        _all(None, TRAIN, STUDY),
        rule=rules.POSITIVE,
    ),
    Setting(
        "mlkd_variant",
        "text",
        "MLKD as its released code computes it, or as its paper writes it.",
        "Loss",
        _all("reference", TRAIN),
        choices=MLKD_VARIANTS,
    ),
    Setting(
        "teacher_fix",
        "text",
        "sort: give the target class the teacher's largest logit (Sort), with any loss.",
        "Loss",
        _all("none", TRAIN),
        choices=TEACHER_FIXES,
    ),
    Setting(
        "ctkd",
        "bool",
        "Learn a global temperature adversarially (CTKD), with --loss kd or dkd.",
        "Loss",
        _all(False, TRAIN),
    ),
    Setting("ctkd_t_start", "float", "CTKD: T = t_start + t_end·σ(θ).", "Loss", _all(1.0, TRAIN), rule=rules.POSITIVE),
    Setting("ctkd_t_end", "float", "CTKD: the range above t_start.", "Loss", _all(20.0, TRAIN), rule=rules.POSITIVE),
    Setting(
        "ctkd_decay",
        "text",
        "CTKD λ schedule (upstream --cosine_decay 1 / 0).",
        "Loss",
        _all("cosine", TRAIN),
        choices=CTKD_DECAYS,
    ),
    Setting(
        "ctkd_decay_epochs",
        "int",
        "CTKD λ schedule length in epochs (upstream --decay_loops; its ImageNet script uses 5).",
        "Loss",
        _all(10, TRAIN),
        rule=rules.INT_AT_LEAST_1,
    ),
    Setting(
        "ctkd_decay_max",
        "float",
        "Start of the CTKD λ schedule (upstream --decay_max).",
        "Loss",
        _all(0.0, TRAIN),
        rule=rules.ANY_NUMBER,
    ),
    Setting(
        "ctkd_decay_min",
        "float",
        "End of the cosine CTKD λ schedule (upstream --decay_min); linear steps by (max − min)/epochs.",
        "Loss",
        _all(-1.0, TRAIN),
        rule=rules.ANY_NUMBER,
    ),
    Setting(
        "base_temp",
        "float",
        "With an mdistiller/LS --config and --logit-stand: LS's train.py --base-temp (default 2), as there.",
        "Loss",
        _all(None, TRAIN),
        rule=rules.POSITIVE,
    ),
]
_OPTIMIZATION = [
    Setting(
        "student",
        "text",
        "Student model name (`kdcache models`).",
        "Optimization",
        {TRAIN: Use(REQUIRED), STUDY: Use(REQUIRED)},
    ),
    Setting(
        "epochs",
        "int",
        "Training epochs.",
        "Optimization",
        {TRAIN: Use(240), STUDY: Use(240), QUICKSTART: Use(6, "Student epochs (the teacher trains a third longer).")},
        rule=rules.INT_AT_LEAST_1,
    ),
    Setting(
        "batch_size",
        "int",
        "Samples per training batch (the global batch under torchrun).",
        "Optimization",
        {DUMP: Use(256, "Views per teacher loader batch."), TRAIN: Use(64), STUDY: Use(64)},
        rule=rules.INT_AT_LEAST_1,
    ),
    Setting(
        "lr",
        "float",
        "Learning rate. Default 0.05 (0.01 for MobileNetV2/ShuffleNet students; MLKD 0.025).",
        "Optimization",
        _all(None, TRAIN, STUDY),
        rule=rules.POSITIVE,
    ),
    Setting(
        "lr_milestones",
        "epochs",
        "Epochs after which the LR is multiplied by --lr-decay-rate. Default 150,180,210 (the CIFAR-100 recipe's) for "
        "runs of 240 epochs or more; a shorter run decays at the same fractions of its length (62.5, 75, 87.5%).",
        "Optimization",
        _all(None, TRAIN, STUDY),
        metavar="E1,E2,...",
    ),
    Setting(
        "lr_decay_rate",
        "float",
        "LR factor at each milestone.",
        "Optimization",
        _all(0.1, TRAIN),
        rule=rules.DECAY_RATE,
    ),
    Setting("weight_decay", "float", "SGD weight decay.", "Optimization", _all(5e-4, TRAIN), rule=rules.AT_LEAST_0),
    Setting("momentum", "float", "SGD momentum.", "Optimization", _all(0.9, TRAIN), rule=rules.MOMENTUM),
    Setting(
        "seed",
        "int",
        "Student init, sample order and per-epoch view draws.",
        "Optimization",
        _all(0, TRAIN, STUDY),
        rule=rules.SEED,
    ),
    Setting(
        "counts",
        "ints",
        "Views to train from, e.g. 1,2,4,8 (default: powers of two up to the cache's views).",
        "Optimization",
        _all(None, STUDY),
        metavar="N1,N2,...",
    ),
]
_COMPUTE = [
    Setting(
        "device",
        "text",
        "auto (a GPU when there is one), cpu, cuda or cuda:N.",
        "Compute",
        _all("auto", DUMP, TRAIN, STUDY, VERIFY, PUBLISH),
    ),
    Setting(
        "amp",
        "text",
        "Autocast dtype.",
        "Compute",
        {
            DUMP: Use("none", "Teacher autocast dtype."),
            TRAIN: Use(
                "none", "Student autocast dtype (the loss is computed in float32; fp16 adds a gradient scaler)."
            ),
        },
        choices=AMP_MODES,
    ),
    Setting(
        "channels_last",
        "bool",
        "Student weights and inputs in channels-last memory format.",
        "Compute",
        _all(False, TRAIN),
    ),
    Setting("compile", "bool", "torch.compile the student's training forward pass.", "Compute", _all(False, TRAIN)),
    Setting(
        "workers",
        "int",
        "DataLoader worker processes building views (0: in the main process).",
        "Compute",
        _all(0, DUMP, TRAIN, STUDY),
        rule=rules.INT_AT_LEAST_0,
    ),
    Setting(
        "parallel",
        "int",
        "Students at once on this machine (one CPU thread each unless --threads).",
        "Compute",
        {SWEEP: Use(1), QUICKSTART: Use(2)},
        rule=rules.INT_AT_LEAST_1,
    ),
    Setting("per_gpu", "int", "Students sharing one GPU.", "Compute", _all(1, SWEEP), rule=rules.INT_AT_LEAST_1),
    Setting(
        "threads",
        "int",
        "CPU threads per student, whatever --parallel is (CPU results depend on it, so keep it to compare sweeps).",
        "Compute",
        _all(1, SWEEP),
        rule=rules.INT_AT_LEAST_1,
    ),
]
_OUTPUT = [
    Setting(
        "out",
        "path",
        "Where the results go.",
        "Output",
        {
            DUMP: Use(REQUIRED, "Store: a directory or any fsspec URL zarr accepts."),
            TRAIN: Use(REQUIRED, "Run directory (config.yaml, metrics.jsonl, last.pt, best.pt)."),
            STUDY: Use(REQUIRED, "Study folder: one run per point, study.json, views.png."),
            QUICKSTART: Use("data/quickstart", "Where runs, caches and results go."),
            SWEEP: Use(REQUIRED, "Sweep folder: runs/, caches/, spec.yaml, summary.csv, results.md, curves.png."),
        },
    ),
    Setting("resume", "bool", "Continue the run in --out where it stopped.", "Output", _all(False, TRAIN)),
    Setting(
        "plot",
        "plot",
        "Write a PNG plot: alone, to its default place.",
        "Output",
        {
            TRAIN: Use(None, "Write the training curves as PNG (--plot alone: RUN/curves.png)."),
            INSPECT: Use(
                None, "Write per-view teacher accuracy and confidence (or agreement) as PNG (--plot alone: views.png)."
            ),
        },
        optional_value="",
        metavar="[PATH]",
    ),
    Setting(
        "config",
        "path",
        "YAML settings: this command's flag names as keys (train-student also reads "
        "mdistiller/LS/MLKD configs). Flags on the command line override the file.",
        "Output",
        _all(None, DUMP, TRAIN),
    ),
    Setting("report", "bool", "Only rebuild the report from the runs finished so far.", "Output", _all(False, SWEEP)),
    Setting(
        "prune",
        "bool",
        "Move the run folders in --out that the SPEC no longer names to --out/pruned/ (the report leaves them out "
        "either way).",
        "Output",
        _all(False, SWEEP),
    ),
]
_CLUSTER = [
    Setting(
        "scheduler",
        "text",
        "Run on an existing dask.distributed cluster (tcp://HOST:PORT).",
        "Cluster",
        _all(None, DUMP, SWEEP),
    ),
    Setting(
        "local_cluster",
        "int",
        "Run on a new dask LocalCluster of N worker processes (one per GPU).",
        "Cluster",
        _all(None, DUMP, SWEEP),
        rule=rules.INT_AT_LEAST_1,
    ),
]
_OTHER = [
    Setting("preset", "text", "A SPEC shipped with kdcache instead of SPEC (ls-cifar100).", "Other", _all(None, SWEEP)),
    Setting(
        "yes",
        "bool",
        "Start a --preset on a machine without a GPU (its work ahead and a CPU estimate are stated first).",
        "Other",
        _all(False, SWEEP),
    ),
    Setting("torchvision", "bool", "Also list torchvision.<arch> names.", "Other", _all(False, MODELS)),
    Setting("timm", "bool", "Also list timm.<name> names (needs kdcache[timm]).", "Other", _all(False, MODELS)),
]

_SHARING = [
    Setting(
        "cache_dir",
        "path",
        "Local folder keeping what reading a remote cache (http(s)://, s3://, hf://) fetched, checked against its "
        "manifest, so the next run reads it from disk. Default $KDCACHE_CACHE_DIR, else $XDG_CACHE_HOME/kdcache or "
        "~/.cache/kdcache.",
        "Cache",
        _all(None, TRAIN, STUDY, SWEEP, INSPECT, VERIFY, DERIVE, PUBLISH),
    ),
    Setting(
        "kind",
        "text",
        "MLKD caches: pull the weak views only (enough for single-view losses), the strong ones only, or both "
        "(default: every kind the cache has).",
        "Views",
        _all(None, PULL),
        choices=KINDS,
    ),
]

#: Every setting by its Python name, in the order ``--help`` lists them within a group.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        *_DATA,
        *_TEACHER,
        *_VIEWS,
        *_CACHE,
        *_LOSS,
        *_OPTIMIZATION,
        *_COMPUTE,
        *_OUTPUT,
        *_CLUSTER,
        *_OTHER,
        *_SHARING,
    ]
}


def command_settings(command: str) -> list[Setting]:
    """The settings ``command`` takes, grouped as ``--help`` shows them."""
    taken = [s for s in SETTINGS.values() if command in s.uses]
    return sorted(taken, key=lambda s: GROUPS.index(s.group))


def choices(name: str) -> tuple[str, ...]:
    """The choice list of a setting (``choices("augment")`` is the recipe names)."""
    return SETTINGS[name].choices


class Defaults:
    """One command's defaults as attributes (``TRAIN_DEFAULTS.epochs``), for library signatures."""

    def __init__(self, command: str):
        self._command = command

    def __getattr__(self, name: str) -> Any:
        setting = SETTINGS.get(name)
        if setting is None or self._command not in setting.uses:
            raise AttributeError(f"{self._command} has no setting {name!r}")
        return setting.default(self._command)


DUMP_DEFAULTS, TRAIN_DEFAULTS, STUDY_DEFAULTS = Defaults(DUMP), Defaults(TRAIN), Defaults(STUDY)
VERIFY_DEFAULTS, QUICKSTART_DEFAULTS, SWEEP_DEFAULTS = Defaults(VERIFY), Defaults(QUICKSTART), Defaults(SWEEP)
PULL_DEFAULTS, DERIVE_DEFAULTS, PUBLISH_DEFAULTS = Defaults(PULL), Defaults(DERIVE), Defaults(PUBLISH)


def _shown(setting: Setting, command: str) -> str:
    use = setting.uses[command]
    if use.default is REQUIRED:
        return "required"
    if use.default is None or use.default is False:
        return "–"
    if isinstance(use.default, tuple):
        return ",".join(str(x) for x in use.default)
    if setting.kind == "size" and isinstance(use.default, int):
        from kdcache.settings.values import shown_size

        return shown_size(use.default)
    return str(use.default)


def settings_markdown() -> str:
    """docs/settings.md: every command's settings with their defaults, choices and help, grouped as ``--help``."""
    lines = [
        "# Settings",
        "",
        "Every flag of every command, from the one table the command line, config files and the Python API read",
        "(`kdcache.settings.SETTINGS`). A config file's keys are the flag names without dashes; the Python name",
        "is the flag with underscores. Old names (aliases) still work and print a deprecation line.",
        "",
    ]
    for command in COMMANDS:
        lines += [f"## `kdcache {command}`", "", "| flag | default | choices | what it is |", "|---|---|---|---|"]
        for s in command_settings(command):
            flag = s.flag + "".join(f" (old: {a})" for a in s.uses[command].aliases)
            text = s.help_for(command).replace("|", "\\|")
            lines.append(f"| `{flag}` | {_shown(s, command)} | {', '.join(s.choices) or '–'} | {text} |")
        lines.append("")
    return "\n".join(lines)
