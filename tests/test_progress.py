"""Long work shows progress in a log file too: a line per epoch of training, a line per tenth of a dump."""

import subprocess
import sys

from kdcache.progress import Progress


def _to_file(tmp_path, *args: str) -> str:
    """``kdcache ARGS > log 2>&1``: stdout and stderr into one file, as under nohup or a batch scheduler."""
    log = tmp_path / "log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "kdcache.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    return text


def test_training_into_a_log_writes_a_line_per_epoch(make_cache, cifar_data, tmp_path):
    data = ["--dataset", "cifar100", "--data-root", str(cifar_data)]  # 96 samples: an epoch takes under a second
    args = ["train-student", "--cache", str(make_cache()), "--student", "resnet8", *data, "--epochs", "2"]
    text = _to_file(tmp_path, *args, "--batch-size", "32", "--out", str(tmp_path / "run"))
    lines = [x for x in text.splitlines() if x.startswith("epoch ")]
    assert [x.split()[1] for x in lines] == ["1/2", "2/2"] and all("ETA" in x for x in lines)


def test_a_dump_into_a_log_writes_a_line_per_tenth(teacher_ckpt, cifar_data, tmp_path):
    data = ["--dataset", "cifar100", "--data-root", str(cifar_data)]
    args = ["dump-logits", "--teacher", "resnet8", "--checkpoint", str(teacher_ckpt[100]), *data]
    text = _to_file(tmp_path, *args, "--augment", "cifar", "--views", "2", "--out", str(tmp_path / "c.zarr"))
    steps = [x for x in text.splitlines() if x.startswith("dump-logits: ")]
    assert 1 <= len(steps) <= 10 and "100%" in steps[-1] and "views/s" in steps[-1] and "ETA" in steps[-1]
    assert "gpu_wait" not in text  # a CPU dump names no GPU stage


def test_progress_lines_count_tenths(capsys, monkeypatch):
    monkeypatch.setattr("kdcache.progress.is_terminal", lambda: False)
    bar = Progress(1000, "job", "item")
    for _ in range(20):
        bar.update(50)
    bar.close()
    out = [x for x in capsys.readouterr().out.splitlines() if x.startswith("job: ")]
    assert [x.split()[1] for x in out] == [f"{p}%" for p in range(10, 101, 10)]
