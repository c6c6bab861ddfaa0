from pathlib import Path

import numpy as np
import zarr
from conftest import run_cli

from kdcache.dump.loop import dump_logits
from kdcache.store.verify import verify_cache


def _dump(root: Path, ckpt: Path, out: Path) -> Path:
    dump_logits(
        teacher="resnet8",
        checkpoint=str(ckpt),
        dataset="cifar100",
        data_root=str(root),
        augment="mlkd",
        views=2,
        out=str(out),
        progress=False,
    )
    return out


def test_clean_cache_verifies_with_replay(cifar_root, teacher_ckpt, tmp_path):
    out = _dump(cifar_root, teacher_ckpt[100], tmp_path / "c.zarr")
    report = verify_cache(str(out), "resnet8", str(teacher_ckpt[100]), sample=6, data_root=str(cifar_root))
    assert report.ok, report.problems
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0 and "clean" in proc.stdout


def test_flipped_byte_is_named(cifar_root, teacher_ckpt, tmp_path):
    out = _dump(cifar_root, teacher_ckpt[100], tmp_path / "c.zarr")
    chunk = out / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    proc = run_cli("verify", str(out))
    assert proc.returncode == 1
    assert "array logits, view 1, chunk 0" in proc.stdout


def test_replay_drift_and_incomplete_are_reported(cifar_root, teacher_ckpt, tmp_path):
    out = _dump(cifar_root, teacher_ckpt[100], tmp_path / "c.zarr")
    g = zarr.open_group(str(out), mode="r+")
    p = g["params"][...]
    p[..., 2] = 1 - p[..., 2]  # every weak view now flips the other way
    g["params"][...] = p
    g["done"][1, 0] = 0
    report = verify_cache(str(out), "resnet8", str(teacher_ckpt[100]), sample=5, data_root=str(cifar_root))
    text = "\n".join(report.problems)
    assert "incomplete: 1 chunks" in text and "rebuilt views have different pixels" in text
    assert np.isfinite(g["logits"][0].astype(np.float32)).all()


def test_store_of_a_newer_format_is_refused(cifar_root, teacher_ckpt, tmp_path):
    out = _dump(cifar_root, teacher_ckpt[100], tmp_path / "c.zarr")
    zarr.open_group(str(out), mode="r+").attrs["kdcache_format"] = 99
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 2 and "newer than this kdcache reads" in proc.stderr and "upgrade kdcache" in proc.stderr


def test_inspect_names_a_corrupt_chunk(cifar_root, teacher_ckpt, tmp_path):
    out = tmp_path / "c.zarr"
    dump_logits(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_root),
        augment="cifar",
        views=2,
        out=str(out),
        progress=False,
    )
    chunk = out / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 2 and "array logits, view 1, chunk 0 is corrupt" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
