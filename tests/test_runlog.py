"""RunLog: metrics.jsonl always, the same scalars as TensorBoard events when tensorboard is installed, and resume."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.errors import KdcacheError
from kdcache.train.runlog import RunLog

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed"
)


def _record(epoch: int, shift: float = 0.0) -> dict:
    return {
        "epoch": epoch,
        "lr": 0.1 / epoch + shift,
        "train_loss": 2.5 - 0.3 * epoch + shift,
        "test_top1": 10.0 * epoch + shift,
        "seconds": 1.25 * epoch,
    }


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard holds for ``records``: every scalar but epoch, at step epoch, as float32."""
    keys = [k for k in records[0] if k != "epoch"]
    return {k: [(r["epoch"], float(np.float32(r[k]))) for r in records] for k in keys}


def test_records_round_trip(tmp_path: Path):
    log = RunLog(tmp_path / "run")
    records = [_record(e) for e in (1, 2, 3)]
    for r in records:
        log.write(r)
    log.close()
    assert log.history() == records and _lines(tmp_path / "run") == records


@needs_tensorboard
def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path: Path):
    log = RunLog(tmp_path)
    for e in (1, 2, 3):
        log.write({**_record(e), "note": "text is not a scalar", "improved": True})
    log.close()
    assert _tensorboard_scalars(tmp_path) == _expected_scalars([_record(e) for e in (1, 2, 3)])
    assert _lines(tmp_path)[0]["note"] == "text is not a scalar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


@needs_tensorboard
def test_resume_truncates_metrics_and_purges_tensorboard(tmp_path: Path):
    log = RunLog(tmp_path)
    for e in (1, 2, 3, 4):  # epochs 3 and 4 are written after the checkpoint the run resumes from
        log.write(_record(e))
    log.close()
    time.sleep(1.1)  # event files are named by the second they start in: keep the resumed one sorting last
    resumed = RunLog(tmp_path, resume_epoch=2)
    assert resumed.history() == [_record(1), _record(2)] and _lines(tmp_path) == resumed.history()
    for e in (3, 4, 5):
        resumed.write(_record(e, shift=100.0))
    resumed.close()
    final = [_record(1), _record(2)] + [_record(e, shift=100.0) for e in (3, 4, 5)]
    assert _lines(tmp_path) == final and resumed.history() == final
    assert _tensorboard_scalars(tmp_path) == _expected_scalars(final)


def test_fresh_run_replaces_old_metrics_and_a_torn_last_line_is_dropped(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_record(1)) + "\n" + '{"epoch": 2, "lr"')
    assert RunLog(tmp_path, enabled=False, resume_epoch=5).history() == [_record(1)]
    RunLog(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1,\n' + json.dumps(_record(2)) + "\n")
    with pytest.raises(KdcacheError, match="metrics.jsonl line 1 is not a JSON record"):
        RunLog(tmp_path, resume_epoch=2)


def test_disabled_rank_writes_nothing(tmp_path: Path):
    log = RunLog(tmp_path / "run", enabled=False)
    log.write(_record(1))
    log.close()
    assert log.history() == [_record(1)] and not (tmp_path / "run").exists()


def test_layout_without_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    log = RunLog(tmp_path)
    log.write(_record(1))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert _lines(tmp_path) == [_record(1)]
