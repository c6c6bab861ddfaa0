"""GPU-only behaviour: every test here is marked ``gpu``, which conftest.py skips where no CUDA device is visible
(on a GPU host, ``pytest -m gpu`` runs just these)."""

import pytest
import torch
from helpers import same_weights

from kdcache.dataset.datasets import build_dataset
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model
from kdcache.teacher.runner import load_teacher

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_graph_replay_equals_eager_forward_and_turns_on_determinism(tmp_path, amp):
    ds = build_dataset("digits")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.pth", create_model("resnet8", ds.num_classes))
    teacher = load_teacher(
        "resnet8", ds.num_classes, ds.norm, str(tmp_path / "t.pth"), device="cuda", forward_block=64, amp=amp
    )
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.utils.deterministic.fill_uninitialized_memory
    x = torch.randint(0, 256, (150, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    graphed = teacher(x)
    with torch.inference_mode():
        eager = torch.cat(
            [
                teacher._forward(torch.cat([x[s : s + 64], x.new_zeros((max(0, s + 64 - 150), 3, 32, 32))]))[
                    : min(64, 150 - s)
                ].cpu()
                for s in range(0, 150, 64)
            ]
        )
    assert graphed.shape == (150, ds.num_classes) and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager)
    assert torch.equal(teacher(x[:70]), graphed[:70])  # a shorter batch pads its last block the same way


def test_dump_on_gpu_gives_the_same_logits_for_any_batch_size(tmp_path):
    import zarr

    from kdcache.dump.loop import dump_logits, join_pixels

    ds = build_dataset("digits")
    small = type(ds)("digits", "train", ds.images[:200], ds.labels[:200], 10, ds.norm)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.pth", create_model("resnet8", ds.num_classes))
    logits = []
    for bs in (7, 64):  # 7: forward blocks span loader batches, which are joined in pinned memory
        out = tmp_path / f"b{bs}.zarr"
        dump_logits(
            teacher="resnet8",
            checkpoint=str(tmp_path / "t.pth"),
            dataset="digits",
            augment="mlkd",
            views=2,
            out=str(out),
            batch_size=bs,
            workers=2,
            device="cuda",
            dtype="float32",
            progress=False,
            data=small,
        )
        logits.append(zarr.open_group(str(out))["logits_strong"][...])
    assert torch.equal(torch.from_numpy(logits[0]), torch.from_numpy(logits[1]))
    parts = [
        torch.zeros((2, 5, 3, 4, 4), dtype=torch.uint8).pin_memory()[:, 2:],
        torch.ones((2, 3, 3, 4, 4), dtype=torch.uint8),
    ]
    assert join_pixels(parts, pin=True).is_pinned()


@pytest.mark.parametrize(
    "amp,channels_last,compile", [("bf16", True, False), ("fp16", False, False), ("bf16", True, True)]
)
def test_student_precision_modes_on_gpu_cached_equals_online(
    make_cache, teacher_ckpt, tmp_path, amp, channels_last, compile
):
    from kdcache.train.trainer import train_student

    cache = make_cache(dataset="digits", dtype="float32")  # dumped on the GPU (device auto), as the online teacher runs
    mode = dict(student="resnet8", dataset="digits", epochs=2, device="cuda", progress=False)
    mode.update(amp=amp, channels_last=channels_last, compile=compile)
    a = train_student(out=tmp_path / "cached", cache=str(cache), **mode)
    teacher = dict(teacher="resnet8", checkpoint=str(teacher_ckpt[10]))
    b = train_student(out=tmp_path / "online", **teacher, augment="cifar", views=2, **mode)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert same_weights(tmp_path / "cached" / "last.pt", tmp_path / "online" / "last.pt")
