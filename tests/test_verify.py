import numpy as np
import zarr
from helpers import cli

from kdcache.store.verify import verify_cache


def test_clean_cache_verifies_with_replay(cifar_root, teacher_ckpt, make_cache):
    out = make_cache(augment="mlkd")
    report = verify_cache(str(out), "resnet8", str(teacher_ckpt[100]), sample=6, data_root=str(cifar_root))
    assert report.ok, report.problems
    proc = cli("verify", out)
    assert proc.returncode == 0 and "clean" in proc.stdout


def test_flipped_byte_is_named(make_cache, tmp_path):
    out = make_cache(augment="mlkd", copy_to=tmp_path)
    chunk = out / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    proc = cli("verify", out)
    assert proc.returncode == 1
    assert "array logits, view 1, chunk 0" in proc.stdout


def test_replay_drift_and_incomplete_are_reported(cifar_root, teacher_ckpt, make_cache, tmp_path):
    out = make_cache(augment="mlkd", copy_to=tmp_path)
    g = zarr.open_group(str(out), mode="r+")
    p = g["params"][...]
    p[..., 2] = 1 - p[..., 2]  # every weak view now flips the other way
    g["params"][...] = p
    g["done"][1, 0] = 0
    report = verify_cache(str(out), "resnet8", str(teacher_ckpt[100]), sample=5, data_root=str(cifar_root))
    text = "\n".join(report.problems)
    assert "incomplete: 1 chunks" in text and "rebuilt views have different pixels" in text
    assert np.isfinite(g["logits"][0].astype(np.float32)).all()


def test_store_of_a_newer_format_is_refused(make_cache, tmp_path):
    out = make_cache(augment="mlkd", copy_to=tmp_path)
    zarr.open_group(str(out), mode="r+").attrs["kdcache_format"] = 99
    proc = cli("inspect", out)
    assert proc.returncode == 2 and "newer than this kdcache reads" in proc.stderr and "upgrade kdcache" in proc.stderr


def test_inspect_names_a_corrupt_chunk(make_cache, tmp_path):
    out = make_cache(copy_to=tmp_path)
    chunk = out / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))
    proc = cli("inspect", out)
    assert proc.returncode == 2 and "array logits, view 1, chunk 0 is corrupt" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
