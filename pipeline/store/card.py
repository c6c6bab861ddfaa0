"""The cache card: ``README.md`` at a store's root in the Hugging Face dataset-card form (YAML front matter, then
prose), and the facts it states, which ``kdcache inspect`` shows from a cache's metadata alone.

The facts come from the store's attributes and manifest: teacher, checkpoint sha256 and accuracy, dataset and its
fingerprint, recipe and views, format, dtype, size, the command that made it and one that trains from it. The
teacher's test top-1 is measured by ``kdcache publish --checkpoint`` (the cache holds train views only); licence
fields are left for the publisher to fill in and kept when the card is written again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kdcache.dataset.datasets import build_dataset, test_split
from kdcache.errors import KdcacheError
from kdcache.models.checkpoints import file_sha256
from kdcache.store.cache import CacheStore, json_int
from kdcache.store.manifest import Manifest
from kdcache.teacher.runner import load_teacher
from kdcache.views.recipes import recipe_from_attrs

#: Front-matter fields the publisher fills in; a card written again keeps what they hold.
LICENCE_FIELDS = ("license", "license_name", "license_link")
TO_FILL = "unknown"
URL_HERE = "URL"  # stands for wherever the published folder is served


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short name for a dataset fingerprint (sha256 of its JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def dump_command(store: CacheStore) -> str:
    """The ``dump-logits`` command that makes this cache again (the checkpoint named by its sha256)."""
    a, t, ds = store.attrs, store.attr_dict("teacher"), store.attr_dict("dataset")
    recipe = store.attr_dict("recipe")
    parts = ["kdcache dump-logits", f"--teacher {t['name']}"]
    if t.get("checkpoint_sha256"):
        parts.append("--checkpoint TEACHER.pth")
    if t.get("weights"):
        parts.append(f"--weights {t['weights']}")
    parts += [f"--dataset {ds['name']}", f"--split {a['split']}", f"--augment {recipe['name']}"]
    if recipe.get("mix"):
        parts += [f"--mix {recipe['mix']}", f"--mix-alpha {recipe.get('mix_alpha')}"]
    parts += [f"--views {a.get('views_requested', store.num_views)}", f"--view-seed {a['seed']}"]
    parts += [f"--dtype {a['dtype']}", f"--format {store.format}", f"--forward-block {t['forward_block']}"]
    parts += [f"--amp {t['amp']}", "--out CACHE"]
    return " ".join(parts)


def made_with(store: CacheStore) -> str:
    """How the cache was made: the derive command for a derived one, else its dump command."""
    derived = store.attrs.get("derived_from")
    if isinstance(derived, dict) and derived.get("command"):
        return str(derived["command"])
    return dump_command(store)


def train_command(store: CacheStore, url: str = URL_HERE) -> str:
    """One command that trains a student from the cache at ``url``."""
    ds = store.attr_dict("dataset")
    recipe = store.attr_dict("recipe")
    loss = "mlkd" if recipe.get("name") == "mlkd" and store.num_kinds == 2 and not store.format.is_topk else "kd"
    root = " --data-root data" if ds["name"] != "digits" else ""
    return (
        f"kdcache train-student --cache {url} --dataset {ds['name']}{root} --student resnet8x4 --loss {loss} "
        "--out runs/student"
    )


def card_facts(store: CacheStore, manifest: Manifest | None, test_top1: float | None = None) -> dict[str, Any]:
    """What the card states, from the store's attributes and manifest only (no chunk is read)."""
    a, t, ds = store.attrs, store.attr_dict("teacher"), store.attr_dict("dataset")
    top1 = a.get("teacher_top1")
    views_top1 = float(100 * np.mean(top1)) if isinstance(top1, list) and top1 else None
    return {
        "teacher": {
            "name": t["name"],
            "checkpoint_sha256": t.get("checkpoint_sha256"),
            "weights": t.get("weights"),
            "test_top1": None if test_top1 is None else round(float(test_top1), 4),
            "train_views_top1": None if views_top1 is None else round(views_top1, 4),
        },
        "dataset": {
            "name": ds["name"],
            "split": a["split"],
            "samples": store.num_samples,
            "classes": store.num_classes,
            "fingerprint": fingerprint_digest(dict(ds)),
            **{k: ds[k] for k in ("labels_sha256", "images_sha256", "files_sha256") if k in ds},
        },
        "recipe": store.attr_dict("recipe").get("name"),
        "mix": store.attr_dict("recipe").get("mix", "none"),
        "views": store.num_views,
        "views_mode": a.get("views_mode"),
        "view_seed": a.get("seed"),
        "format": str(store.format),
        "dtype": a.get("dtype"),
        "size_bytes": None if manifest is None else manifest.total_bytes,
        "files": None if manifest is None else len(manifest.files),
        "made_with": made_with(store),
        "derived_from": a.get("derived_from"),
        "created": a.get("created"),
    }


def _size_category(n: int) -> str:
    for limit, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10**7 else "n>10M"


def _front_matter(facts: dict[str, Any], licence: dict[str, Any]) -> str:
    t, ds = facts["teacher"], facts["dataset"]
    head = {
        "license": licence.get("license", TO_FILL),
        **{k: licence[k] for k in LICENCE_FIELDS[1:] if k in licence},
        "pretty_name": f"kdcache teacher logits: {t['name']} on {ds['name']} ({ds['split']}), {facts['views']} views",
        "tags": ["knowledge-distillation", "kdcache", "teacher-logits"],
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(int(ds["samples"]))],
        "kdcache": facts,
    }
    text = yaml.safe_dump(head, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if "license" not in licence:
        text = text.replace(
            f"license: {TO_FILL}\n",
            f"license: {TO_FILL}  # fill in: this cache's licence id; the dataset's and the teacher's terms apply\n",
            1,
        )
    return f"---\n{text}---\n"


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.2f} MiB"


def card_text(facts: dict[str, Any], licence: dict[str, Any] | None = None) -> str:
    """The whole ``README.md``: front matter, then what the cache is, how it was made and how to train from it."""
    t, ds = facts["teacher"], facts["dataset"]
    test = "not measured (`kdcache publish --checkpoint` measures it)"
    if t["test_top1"] is not None:
        test = f"{t['test_top1']:.2f}%"
    views_top1 = "unknown" if t["train_views_top1"] is None else f"{t['train_views_top1']:.2f}%"
    derived = facts["derived_from"]
    lines = [
        f"# Teacher logits: {t['name']} on {ds['name']} ({ds['split']})",
        "",
        "A kdcache cache: the teacher's logits for replayable augmented views "
        "of a dataset, in a Zarr v3 store, for training students by knowledge distillation without the teacher.",
        "",
        "## What is in it",
        "",
        f"- **Teacher**: `{t['name']}`, checkpoint sha256 `{t['checkpoint_sha256']}`; test top-1 {test}; top-1 on "
        f"the cached views {views_top1}.",
        f"- **Dataset**: `{ds['name']}` split `{ds['split']}`, {ds['samples']} samples, {ds['classes']} classes; "
        f"fingerprint `{ds['fingerprint']}` (labels sha256 `{ds.get('labels_sha256')}`).",
        f"- **Views**: {facts['views']} {facts['views_mode']} views per sample of the `{facts['recipe']}` recipe "
        f"(mix {facts['mix']}, view seed {facts['view_seed']}), each with its parameters and pixel hash.",
        f"- **Format**: `{facts['format']}`, dtype `{facts['dtype']}`.",
        f"- **Size**: {_mib(facts['size_bytes'])} in {facts['files']} files; `manifest.json` lists each with its "
        "size and sha256.",
    ]
    if derived:
        lines.append(f"- **Derived from**: `{derived.get('location')}` (views {derived.get('views')}).")
    lines += ["", "## How it was made", "", "```", facts["made_with"], "```", "", "## Train a student from it", ""]
    lines += ["```", facts["train"], "```", ""]
    lines += [
        f"`{URL_HERE}` is where this folder is served (`https://...`, `s3://...`, `hf://datasets/ORG/NAME/...`). "
        f"`kdcache pull {URL_HERE} DIR` makes a verified local copy, `kdcache verify {URL_HERE}` checks every file "
        f"against the manifest, `kdcache inspect {URL_HERE}` shows these facts before any chunk is read.",
        "",
        "## Licence",
        "",
        "Fill in the `license` field above: the dataset's terms and the teacher weights' terms apply to these logits "
        "too. Name them here.",
        "",
    ]
    return _front_matter(facts, licence or {}) + "\n" + "\n".join(lines)


def read_card(text: bytes | str | None) -> dict[str, Any]:
    """The front matter of a card (empty when there is none or it does not parse)."""
    if text is None:
        return {}
    s = text.decode(errors="replace") if isinstance(text, bytes) else text
    if not s.startswith("---\n") or "\n---\n" not in s[4:]:
        return {}
    try:
        data = yaml.safe_load(s[4 : s.index("\n---\n", 4)])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def write_card_text(
    store: CacheStore, manifest: Manifest | None, test_top1: float | None = None, old: dict[str, Any] | None = None
) -> str:
    """The card of ``store``, keeping the licence fields and the measured test top-1 (same checkpoint) of ``old``."""
    old = old or {}
    kept = old.get("kdcache", {}).get("teacher", {}) if isinstance(old.get("kdcache"), dict) else {}
    sha = store.attr_dict("teacher").get("checkpoint_sha256")
    if test_top1 is None and isinstance(kept, dict) and kept.get("checkpoint_sha256") == sha:
        test_top1 = kept.get("test_top1")
    facts = {**card_facts(store, manifest, test_top1), "train": train_command(store)}
    licence = {k: old[k] for k in LICENCE_FIELDS if k in old and old[k] != TO_FILL}
    return card_text(facts, licence)


@torch.inference_mode()
def measure_test_top1(
    store: CacheStore, checkpoint: str | None, data_root: str | None, device: str, batch: int = 256
) -> float:
    """The cache's teacher's top-1 (%) on the dataset's test split, from ``checkpoint`` (its sha256 must be the
    cache's)."""
    t, name = store.attr_dict("teacher"), str(store.attr_dict("dataset")["name"])
    if checkpoint is not None and Path(checkpoint).is_file() and file_sha256(checkpoint) != t.get("checkpoint_sha256"):
        raise KdcacheError(
            f"--checkpoint {checkpoint} is not the checkpoint this cache was made with (sha256 differs): pass the "
            "teacher's own checkpoint, or leave --checkpoint out"
        )
    test = build_dataset(name, data_root, test_split(name))
    block = json_int(t["forward_block"], "teacher.forward_block")
    weights = str(t["weights"]) if t.get("weights") else None
    model = load_teacher(str(t["name"]), test.num_classes, test.norm, checkpoint, weights, device, block, str(t["amp"]))
    if model.checkpoint_sha256 != t.get("checkpoint_sha256"):
        raise KdcacheError(
            f"--checkpoint {checkpoint} is not the checkpoint this cache was made with (sha256 differs): pass the "
            "teacher's own checkpoint, or leave --checkpoint out"
        )
    recipe = recipe_from_attrs(store.attr_dict("recipe"))
    correct = 0
    for lo in range(0, len(test), batch):
        ids = range(lo, min(len(test), lo + batch))
        views = torch.stack([recipe.eval_view(test.image(i)) for i in ids])
        correct += int((model(views).argmax(dim=1).numpy() == test.labels[lo : lo + len(ids)]).sum())
    return 100.0 * correct / max(len(test), 1)
