"""create_model: one name for a zoo, torchvision or timm model, with its weights checked before it is built."""

from __future__ import annotations

import difflib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdcache.errors import KdcacheError, first_line
from kdcache.models.zoo import _REGISTRY

if TYPE_CHECKING:
    from timm.models import PretrainedCfg


TORCHVISION_PREFIX = "torchvision."


TIMM_PREFIX = "timm."


_TIMM_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hugging Face repo, in order


def list_models(include_torchvision: bool = False, include_timm: bool = False) -> list[str]:
    """Names ``create_model`` accepts: the CIFAR zoo, and with the flags torchvision's and timm's classifiers."""
    names = sorted(_REGISTRY, key=str.lower)
    if include_torchvision:
        import torchvision

        names += [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    if include_timm:
        names += [TIMM_PREFIX + n for n in _import_timm(TIMM_PREFIX + "<name>").list_models()]
    return names


def _import_timm(name: str) -> ModuleType:
    """The timm package, an optional extra: without it, a one-line install hint."""
    try:
        import timm
    except ImportError:
        raise KdcacheError(f"{name} needs timm: pip install 'kdcache[timm]'") from None
    return timm


def _unknown_model(name: str) -> KdcacheError:
    if name.startswith(TIMM_PREFIX):
        pool = [TIMM_PREFIX + n for n in _import_timm(name).list_models()]
        fallback = f"see timm.list_models('*{name[len(TIMM_PREFIX) :][:5]}*') for names."
    else:
        pool = list_models(include_torchvision=True)
        fallback = "run `kdcache models` for the list."
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else fallback
    return KdcacheError(f"unknown model {name!r}: {hint}")


def check_model_name(name: str) -> None:
    """Refuse a model name that is not in the zoo, torchvision or timm, suggesting near names."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        if name[len(TORCHVISION_PREFIX) :] not in torchvision.models.list_models(module=torchvision.models):
            raise _unknown_model(name)
    elif name.startswith(TIMM_PREFIX):
        arch, dot, tag = name[len(TIMM_PREFIX) :].partition(".")
        if not _import_timm(name).is_model(arch):
            raise _unknown_model(name)
        if dot:  # one spelling per model: caches record the model name and its weights apart
            raise KdcacheError(f"name the model {TIMM_PREFIX}{arch} and pass its pretrained tag as --weights {tag}")
    elif name not in _REGISTRY:
        raise _unknown_model(name)


def create_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build a model that maps normalized images to ``num_classes`` logits.

    ``name`` is a CIFAR zoo name (``resnet32x4``, ``wrn_40_2``, ...),
    ``torchvision.<arch>`` for torchvision's ImageNet models or
    ``timm.<name>`` for timm's. ``weights`` is a torchvision weights name such
    as ``IMAGENET1K_V1`` (downloaded by torchvision, or read from its cache
    ``$TORCH_HOME/hub/checkpoints``), or for timm ``pretrained`` (the default
    tag) or a pretrained tag such as ``tv_in1k``, read from local files only.
    """
    if num_classes < 1:
        raise KdcacheError(f"num_classes must be positive, got {num_classes}")
    check_model_name(name)
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX) :], num_classes, weights)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX) :], num_classes, weights)
    if weights:
        raise KdcacheError(
            f"--weights applies to torchvision and timm models only; load {name} weights with --checkpoint"
        )
    return _REGISTRY[name](num_classes)


def _torchvision_model(arch: str, num_classes: int, weights: str | None) -> nn.Module:
    import torchvision

    if not weights:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    enum = torchvision.models.get_model_weights(arch)
    try:
        w = enum[weights.split(".")[-1]]
    except KeyError:
        valid = ", ".join(m.name for m in enum)
        raise KdcacheError(f"unknown weights {weights!r} for torchvision.{arch}; choose one of: {valid}") from None
    classes = len(w.meta.get("categories", [])) or num_classes
    if classes != num_classes:
        raise KdcacheError(f"weights {w.name} have {classes} classes but the dataset has {num_classes}")
    try:
        return torchvision.models.get_model(arch, weights=w)
    except (OSError, RuntimeError) as exc:
        raise KdcacheError(
            f"cannot load torchvision weights {w.name} ({exc.__class__.__name__}); with no internet put "
            f"{w.url.rsplit('/', 1)[-1]} "
            "into $TORCH_HOME/hub/checkpoints or pass --checkpoint"
        ) from None


def _timm_model(arch: str, num_classes: int, weights: str | None) -> nn.Module:
    """A timm model: random init without ``weights``, else timm's pretrained weights from a file on this machine.

    kdcache never downloads them: runs are often offline (clusters, CI), and
    a missing file should fail at once with where to put it, not mid-dump.
    """
    timm = _import_timm(TIMM_PREFIX + arch)
    if not weights:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    cfg = _timm_pretrained_cfg(timm, arch, weights)
    label = f"timm.{arch} weights {cfg.tag}"
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise KdcacheError(f"{label} have {cfg.num_classes} classes but the dataset has {num_classes}")
    file = _local_timm_weights(cfg)
    if file is None:
        raise KdcacheError(
            f"{label} (--weights {weights}) are not on this machine and kdcache does not download them: "
            f"put {_timm_weights_place(cfg)}, or pass --checkpoint"
        )
    try:
        return timm.create_model(
            f"{arch}.{cfg.tag}", pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(file)}
        )
    except Exception as exc:  # timm, safetensors and torch raise many types for a truncated or foreign file
        raise KdcacheError(f"cannot load {label} from {file}: {first_line(exc)}") from None


def _timm_pretrained_cfg(timm: ModuleType, arch: str, weights: str) -> PretrainedCfg:
    """timm's pretrained config for ``weights``: ``pretrained`` (the default tag) or a tag such as ``tv_in1k``."""
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if not tags:
        raise KdcacheError(f"timm.{arch} has no pretrained weights in timm: pass --checkpoint")
    if weights != "pretrained" and weights not in tags:
        choices = ", ".join(tags)
        raise KdcacheError(f"unknown weights {weights!r} for timm.{arch}; choose pretrained or one of: {choices}")
    return timm.models.get_pretrained_cfg(arch if weights == "pretrained" else f"{arch}.{weights}")


def _local_timm_weights(cfg: PretrainedCfg) -> Path | None:
    """The weights file of a timm pretrained config in the Hugging Face cache or torch's hub cache, if there."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_HF_FILES:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / _url_file(cfg)
        if path.is_file():
            return path
    return None


def _url_file(cfg: PretrainedCfg) -> str:
    """The file name timm downloads a config's URL to: the URL's last part, or the name a (url, file) pair gives."""
    if isinstance(cfg.url, tuple):
        return cfg.url[1]
    return (cfg.url or "").rsplit("/", 1)[-1]


def _timm_weights_place(cfg: PretrainedCfg) -> str:
    """Where a timm weights file must lie for :func:`_local_timm_weights` to find it, said for an error message."""
    if not cfg.hf_hub_id:
        return f"{_url_file(cfg)} into {Path(torch.hub.get_dir()) / 'checkpoints'}"
    from huggingface_hub import constants

    repo = cfg.hf_hub_id.partition("@")[0]
    return f"the Hugging Face repo {repo} into the HF cache {constants.HF_HUB_CACHE} (`hf download {repo}`)"
