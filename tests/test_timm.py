"""timm.<name> models as students and teachers, offline: random init, checkpoints, local pretrained files, refusals."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.dataset.datasets import build_dataset
from kdcache.errors import KdcacheError
from kdcache.models.checkpoints import load_checkpoint, save_checkpoint
from kdcache.models.factory import check_model_name, create_model, list_models
from kdcache.store.cache import open_store
from kdcache.teacher.runner import load_teacher

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")

SMALL = "timm.mobilenetv3_small_050"  # 0.58M parameters: the quickest real timm model on 32x32 on a slow CPU
HUB_REPO = "timm/mobilenetv3_small_050.lamb_in1k"  # its default pretrained tag's Hugging Face repo


def _trained_looking(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """A seeded SMALL with non-trivial BatchNorm statistics, so eval-mode outputs depend on all of its state."""
    torch.manual_seed(seed)
    model = create_model(SMALL, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline with empty Hugging Face and torch hub caches; returns the HF cache folder."""
    from huggingface_hub import constants

    hf = tmp_path / "hf"
    hf.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))  # read at import, so patched where it is looked up
    return hf


@needs_timm
def test_timm_student_has_the_class_count_and_trains_on_32x32():
    assert SMALL in list_models(include_timm=True) and SMALL not in list_models(include_torchvision=True)
    check_model_name(SMALL)
    model = create_model(SMALL, 10).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@needs_timm
@pytest.mark.parametrize("layout", ["zoo", "bare"])
def test_timm_checkpoint_loads_and_teaches(tmp_path: Path, layout: str):
    src = _trained_looking(10)
    ckpt = tmp_path / "t.pth"
    if layout == "zoo":
        save_checkpoint(ckpt, src)
    else:
        torch.save(src.state_dict(), ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), load_checkpoint(create_model(SMALL, 10), ckpt).eval()(x))
    ds = build_dataset("digits", split="test")
    teacher = load_teacher(SMALL, 10, ds.norm, checkpoint=str(ckpt), device="cpu", forward_block=8)
    views = torch.from_numpy(ds.images[:5]).permute(0, 3, 1, 2).contiguous()
    mean, std = torch.tensor(ds.norm.mean).view(1, 3, 1, 1), torch.tensor(ds.norm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = src((views.float() / 255 - mean) / std)
    assert torch.allclose(teacher(views), expected, atol=1e-4)
    assert teacher.identity()["name"] == SMALL and teacher.checkpoint_sha256


@needs_timm
def test_pretrained_weights_come_from_the_local_hf_cache(empty_caches: Path):
    from safetensors.torch import save_file

    src = _trained_looking(1000, seed=3)
    repo = empty_caches / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(src.state_dict(), snapshot / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    for weights in ("pretrained", "lamb_in1k"):
        model = create_model(SMALL, 1000, weights=weights).eval()
        with torch.no_grad():
            assert torch.equal(src(x), model(x))
    (snapshot / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(KdcacheError, match=f"cannot load {SMALL} weights lamb_in1k from .*model.safetensors: "):
        create_model(SMALL, 1000, weights="pretrained")


@needs_timm
def test_missing_pretrained_file_is_one_line_naming_model_weights_and_fix(empty_caches: Path):
    with pytest.raises(KdcacheError) as err:
        create_model(SMALL, 1000, weights="pretrained")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{SMALL} weights lamb_in1k (--weights pretrained) are not on this")
    assert HUB_REPO in msg and str(empty_caches) in msg and msg.endswith("or pass --checkpoint")


@needs_timm
def test_timm_refusals_name_the_problem():
    with pytest.raises(KdcacheError, match=f"did you mean {SMALL}"):
        create_model("timm.mobilenetv3_smal_050", 10)
    with pytest.raises(KdcacheError, match=r"unknown model 'timm.qqqzzz': see timm.list_models\('\*qqqzz\*'\)"):
        check_model_name("timm.qqqzzz")
    with pytest.raises(KdcacheError, match="choose pretrained or one of: lamb_in1k"):
        create_model(SMALL, 1000, weights="in22k")
    with pytest.raises(KdcacheError, match="weights lamb_in1k have 1000 classes but the dataset has 10"):
        create_model(SMALL, 10, weights="pretrained")
    with pytest.raises(KdcacheError, match=f"name the model {SMALL} and pass its pretrained tag as --weights"):
        check_model_name(SMALL + ".lamb_in1k")


def test_timm_names_without_timm_say_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    hint = r"timm.resnet18 needs timm: pip install 'kdcache\[timm\]'"
    with pytest.raises(KdcacheError, match=hint):
        create_model("timm.resnet18", 10)
    with pytest.raises(KdcacheError, match=hint):
        load_teacher("timm.resnet18", 10, build_dataset("digits", split="test").norm, checkpoint="x.pth")
    assert "resnet8" in list_models()


@needs_timm
def test_dump_logits_with_a_timm_teacher(tmp_path: Path):
    src = _trained_looking(10, seed=5)
    save_checkpoint(tmp_path / "t.pth", src)
    out = tmp_path / "c.zarr"
    args = ["dump-logits", "--teacher", SMALL, "--checkpoint", str(tmp_path / "t.pth"), "--dataset", "digits"]
    args += ["--split", "test", "--augment", "none", "--views", "1", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ds = build_dataset("digits", split="test")
    logits = open_store(out).read("logits", 0)
    assert logits.shape == (len(ds), 10) and np.isfinite(logits).all()
    teacher = load_teacher(SMALL, 10, ds.norm, checkpoint=str(tmp_path / "t.pth"), device="cpu")
    views = torch.from_numpy(ds.images[:8]).permute(0, 3, 1, 2).contiguous()
    assert np.array_equal(logits[:8], teacher(views).numpy().astype(np.float16))  # same padded blocks, same bits
    assert len({row.tobytes() for row in logits[:8]}) == 8  # distinct rows, so the order is checked too
