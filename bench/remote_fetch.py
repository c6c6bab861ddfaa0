"""Bytes a remote cache costs: what students and sweeps fetch from a published cache served over HTTP.

Dumps a float16 digits cache of ``--views`` seeded views (1797 samples, one 4096-row chunk per view) from a seeded
resnet8 teacher, publishes it into a folder that a loopback ``http.server`` serves without directory listings, and
counts the body bytes the server sends for:

1. one student drawing from ``--draw`` of the views (``--cache-views``, one view per epoch for as many epochs), with a
   fresh ``--cache-dir``;
2. the same command again with the same ``--cache-dir`` (everything read from disk);
3. a sweep of one student, and a sweep of 4 students (seeds 0-3, ``--parallel 2``), each with a fresh ``--cache-dir``
   and every student drawing the first 2 views (``cache-views: 2``, 2 epochs);
4. ``kdcache pull`` of the whole cache.

Prints a markdown table for docs/benchmarks.md. Run with ``python bench/remote_fetch.py [--views 64] [--draw 8]``
(``--work DIR`` reuses the dump of an earlier run's folder).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from kdcache.dump.loop import dump_logits
from kdcache.models.checkpoints import save_checkpoint
from kdcache.models.factory import create_model


class CountingServer:
    """``http.server`` over a folder in a thread, without directory listings, counting body bytes sent."""

    def __init__(self, root: Path):
        self.sent = 0
        counter = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def list_directory(self, path):
                self.send_error(404)

            def copyfile(self, source, outputfile):
                data = source.read()
                counter.sent += len(data)
                outputfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def kdcache(*args: str) -> float:
    """Run ``kdcache ARGS`` in a process of its own; its wall seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "kdcache.cli", *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def measure(server: CountingServer, *args: str) -> tuple[int, float]:
    server.sent = 0
    seconds = kdcache(*args)
    return server.sent, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--draw", type=int, default=8)
    parser.add_argument("--work", type=Path, help="a folder of an earlier run: its dump is reused")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdcache-remote-"))
    for old in ("r1", "r2", "sweep1", "sweep4", "cd1", "cd-sweep1", "cd-sweep4", "pulled.zarr"):
        shutil.rmtree(work / old, ignore_errors=True)
    cache = work / "full.zarr"
    if not (cache / "manifest.json").is_file():
        torch.manual_seed(0)
        save_checkpoint(work / "teacher.pth", create_model("resnet8", 10), epoch=0)
        common = dict(teacher="resnet8", checkpoint=str(work / "teacher.pth"), dataset="digits", augment="cifar")
        dump_logits(out=str(cache), views=args.views, progress=False, **common)
    kdcache("publish", str(cache), str(work / "www" / "cache.zarr"))
    server = CountingServer(work / "www")
    url = f"{server.url}/cache.zarr"
    manifest = json.loads((work / "www" / "cache.zarr" / "manifest.json").read_text())
    total = manifest["total_bytes"]
    per_view = sum(v["size"] for k, v in manifest["files"].items() if "/c/0/" in k and not k.startswith("labels"))
    student = ["--dataset", "digits", "--student", "resnet8", "--batch-size", "64"]
    train = ["train-student", "--cache", url, *student, "--cache-views", str(args.draw), "--epochs", str(args.draw)]
    rows = [("whole cache (manifest total)", total, None), (f"one view's files (of {args.views})", per_view, None)]
    fetched, s = measure(server, *train, "--out", str(work / "r1"), "--cache-dir", str(work / "cd1"))
    rows.append((f"one student, {args.draw} of {args.views} views, {args.draw} epochs", fetched, s))
    fetched, s = measure(server, *train, "--out", str(work / "r2"), "--cache-dir", str(work / "cd1"))
    rows.append(("the same run again, same --cache-dir", fetched, s))
    # every student draws the same views (each of the first 2, once): what they fetch together is what one does
    spec = {"dataset": "digits", "student": "resnet8", "batch-size": 64, "cache": url, "epochs": 2, "cache-views": 2}
    for seeds, parallel in (([0], 1), ([0, 1, 2, 3], 2)):
        path = work / f"sweep{len(seeds)}.yaml"
        path.write_text(json.dumps({**spec, "seeds": seeds}))
        out, cd = work / f"sweep{len(seeds)}", work / f"cd-sweep{len(seeds)}"
        sweep = ["sweep", str(path), "--out", str(out), "--cache-dir", str(cd), "--parallel", str(parallel)]
        fetched, s = measure(server, *sweep)
        rows.append(
            (f"sweep of {len(seeds)} student(s), 2 of {args.views} views, 2 epochs, --parallel {parallel}", fetched, s)
        )
    fetched, s = measure(server, "pull", url, str(work / "pulled.zarr"))
    rows.append(("kdcache pull of the whole cache", fetched, s))
    print(f"digits, {args.views} float16 views, resnet8; bytes are HTTP body bytes the server sent\n")
    print("| what | bytes | KiB | wall s |\n|---|---:|---:|---:|")
    for name, n, secs in rows:
        print(f"| {name} | {n} | {n / 1024:.1f} | {'' if secs is None else f'{secs:.1f}'} |")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
