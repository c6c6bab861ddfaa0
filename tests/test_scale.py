"""Scale-out: dask.distributed dumps, an S3-compatible store served on localhost, and torchrun students."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from helpers import assert_same_arrays, cli

from kdcache.dump.loop import dump_logits


def _stall_first_unit(marker: str) -> None:
    """In a dask worker: the cluster's first unit task, on whichever worker runs it, waits there until killed (a worker
    started later, or the task's retry, runs for real), so a test kills a worker mid-task however fast the machine
    is."""
    import kdcache.dump.cluster as cluster

    real = cluster.dump_unit

    def dump_unit(job, unit):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return real(job, unit)
        time.sleep(3600)

    cluster.dump_unit = dump_unit  # tasks name it by module and name: a worker unpickles this one


@pytest.mark.slow
def test_cluster_dump_is_bit_identical_and_survives_a_killed_worker(tmp_path, teacher_ckpt, cifar_data, make_cache):
    distributed = pytest.importorskip("distributed")
    common = [
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        "--dataset",
        "cifar100",
        "--data-root",
        str(cifar_data),
        "--augment",
        "mlkd",
        "--views",
        "4",
        "--batch-size",
        "100",
        "--forward-block",
        "64",
    ]
    single = make_cache(augment="mlkd", views=4, forward_block=64)  # common's dump in one process
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(_stall_first_unit, str(tmp_path / "stalled"))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kdcache.cli",
                "dump-logits",
                *common,
                "--out",
                str(tmp_path / "cluster.zarr"),
                "--scheduler",
                cluster.scheduler_address,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        killed, busy_since, deadline = None, {}, time.monotonic() + 300
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            for worker, keys in client.processing().items():
                if any(str(k).startswith("kdcache-unit") for k in keys):
                    busy_since.setdefault(worker, time.monotonic())
                    if time.monotonic() - busy_since[worker] > 0.5:  # the stalled task, mid-way
                        pid = client.run(os.getpid, workers=[worker])[worker]
                        os.kill(pid, signal.SIGKILL)
                        killed = worker
                        break
            time.sleep(0.05)
        if killed is None:
            proc.kill()  # its first task waits to be killed: without the kill it never ends
        out, err = proc.communicate(timeout=300)
    assert killed is not None, err[-2000:]
    assert proc.returncode == 0, err[-2000:]
    assert "dask dashboard: http" in out + err
    assert_same_arrays(single, tmp_path / "cluster.zarr")
    assert zarr.open_group(str(tmp_path / "cluster.zarr"), mode="r").attrs["complete"] is True


@pytest.mark.slow
def test_cluster_dump_of_topk_mixed_views_matches_single_process(tmp_path, teacher_ckpt, cifar_data, make_cache):
    pytest.importorskip("distributed")
    kw = dict(
        teacher="resnet8",
        checkpoint=str(teacher_ckpt[100]),
        dataset="cifar100",
        data_root=str(cifar_data),
        augment="cifar",
        views=2,
        mix="cutmix",
        format="topk:4",
        batch_size=100,
        forward_block=64,
        progress=False,
    )
    single = make_cache(**{k: v for k, v in kw.items() if k not in ("batch_size", "progress")})
    environ = dict(os.environ)
    dump_logits(out=str(tmp_path / "cluster.zarr"), local_cluster=1, **kw)
    assert dict(os.environ) == environ  # dask's nannies set OMP_NUM_THREADS=1 and more here for their workers
    assert_same_arrays(single, tmp_path / "cluster.zarr")
    assert "topk_values" in zarr.open_group(str(tmp_path / "cluster.zarr"), mode="r")


@pytest.mark.slow
def test_cluster_bad_input_is_one_line(tmp_path, teacher_ckpt):
    pytest.importorskip("distributed")
    common = [
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[10]),
        "--dataset",
        "digits",
        "--augment",
        "cifar",
        "--views",
        "1",
        "--out",
        str(tmp_path / "c.zarr"),
    ]
    for extra, message in [
        (["--scheduler", "tcp://127.0.0.1:1", "--local-cluster", "2"], "either --scheduler or --local-cluster"),
        (["--local-cluster", "0"], "--local-cluster must be at least 1"),
        (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the dask scheduler"),
    ]:
        proc = cli(*common, *extra)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "c.zarr").exists()


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on localhost, with one bucket."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="kdcache-test")
    yield env
    server.stop()


@pytest.mark.slow
def test_s3_store_end_to_end(tmp_path, teacher_ckpt, cifar_data, make_cache, s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    url = "s3://kdcache-test/cifar.zarr"
    data = ["--dataset", "cifar100", "--data-root", str(cifar_data)]
    common = [
        "dump-logits",
        "--teacher",
        "resnet8",
        "--checkpoint",
        str(teacher_ckpt[100]),
        *data,
        "--augment",
        "cifar",
        "--views",
        "2",
    ]
    cli(*common, "--out", url, check=True)
    local = make_cache()  # the same dump into a local folder
    assert_same_arrays(url, local)
    again = cli(*common, "--out", url, check=True)
    assert "nothing to do" in again.stdout
    refused = cli(*common, "--out", url, "--view-seed", "1")
    assert refused.returncode == 2 and "seed" in refused.stderr
    assert_same_arrays(url, local)
    assert "complete   2/2 chunks" in cli("inspect", url, check=True).stdout
    replay = ["--teacher", "resnet8", "--checkpoint", str(teacher_ckpt[100]), "--sample", "8"]
    cli("verify", url, *replay, "--data-root", str(cifar_data), check=True)
    cli(
        "train-student",
        "--cache",
        url,
        "--student",
        "resnet8",
        *data,
        "--loss",
        "kd",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "student"),
        check=True,
    )
    assert (tmp_path / "student" / "metrics.jsonl").read_text().count("\n") == 1


def test_feed_reads_only_its_shard_of_chunks(tmp_path):
    from kdcache.errors import KdcacheError
    from kdcache.feed.logits import LogitFeed
    from kdcache.store.cache import CHUNK, create_store

    n = CHUNK + 300
    store = create_store(
        tmp_path / "c.zarr",
        num_views=2,
        labels=np.zeros(n, np.int64),
        num_classes=5,
        dtype="float16",
        kinds=1,
        param_fields=[[]],
        attrs={},
    )
    values = np.random.default_rng(0).normal(size=(2, n, 5)).astype(np.float16)
    store.group["logits"][...] = values
    chunk1 = tmp_path / "c.zarr" / "logits" / "c" / "1" / "1" / "0"
    chunk1.write_bytes(b"\0" * chunk1.stat().st_size)  # view 1, rows CHUNK.. unreadable
    views = np.arange(n) % 2
    for memory in (1 << 30, 0):  # whole shard in RAM, and per-epoch chunk reads
        rows = LogitFeed(store, ["logits"], memory, rows=(0, CHUNK)).get(1, views[:CHUNK])["logits"]
        assert np.array_equal(rows, values[views[:CHUNK], np.arange(CHUNK)])
        with pytest.raises(KdcacheError, match="view 1, chunk 1 is corrupt"):
            LogitFeed(store, ["logits"], memory, rows=(CHUNK - 10, n)).get(1, views[CHUNK - 10 :])


def test_torchrun_more_processes_than_gpus_is_refused(monkeypatch):
    import torch

    import kdcache.feed.ranks
    import kdcache.teacher.runner
    from kdcache.errors import KdcacheError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(kdcache.devices, "deterministic_cuda", lambda: None)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(
        KdcacheError, match="2 processes on this node but only 1 GPU.*--nproc-per-node 1, or --device cpu"
    ):
        kdcache.feed.ranks.init_ranks("auto")


@pytest.mark.slow
def test_torchrun_two_processes_train_write_once_and_resume(tmp_path, cifar_data, make_cache):
    cache = make_cache()
    data = ["--dataset", "cifar100", "--data-root", str(cifar_data)]

    def torchrun(out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kdcache.cli",
            "train-student",
            "--cache",
            str(cache),
            "--student",
            "resnet8",
            *data,
            "--loss",
            "kd",
            "--lr-milestones",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / out),
            *extra,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    whole = torchrun("whole", "--epochs", "2")
    assert whole.stdout.count("best-epoch test top-1") == 1  # rank 0 reports; rank 1 stays quiet
    torchrun("cut", "--epochs", "1")
    torchrun("cut", "--epochs", "2", "--resume")
    import torch

    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    odd = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kdcache.cli",
            "train-student",
            "--cache",
            str(cache),
            "--student",
            "resnet8",
            *data,
            "--epochs",
            "1",
            "--batch-size",
            "63",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "odd"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert odd.returncode != 0 and "must divide among 2 processes" in odd.stderr
