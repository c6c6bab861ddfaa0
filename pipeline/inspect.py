"""Summaries of a cache for ``kdcache inspect``: attributes, completion, size, per-view teacher quality."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.store import CacheStore, disk_bytes, open_store


@dataclass
class CacheReport:
    """What ``inspect`` prints (and plots)."""

    store: CacheStore
    done_chunks: int
    total_chunks: int
    disk_bytes: int | None
    top1: list[float]
    confidence: list[float]

    def lines(self) -> list[str]:
        a = self.store.attrs
        t = a["teacher"]
        ds = a["dataset"]
        out = [
            f"cache      {self.store.location}  (format {a['kdcache_format']}, created {a.get('created')})",
            f"dataset    {ds['name']} / {a['split']}: {ds['length']} samples, {a['num_classes']} classes",
            f"recipe     {a['recipe']['name']}  views {self.store.num_views} ({a['views_mode']})  seed {a['seed']}  dtype {a['dtype']}  "
            f"format {self.store.format}",
            f"teacher    {t['name']}  checkpoint sha256 {str(t['checkpoint_sha256'])[:16]}  block {t['forward_block']}  amp {t['amp']}",
            f"complete   {self.done_chunks}/{self.total_chunks} chunks",
        ]
        if self.disk_bytes is not None:
            per = self.disk_bytes / max(1, self.store.num_views * self.store.num_samples)
            out.append(f"on disk    {self.disk_bytes / 2**20:.2f} MiB ({per:.1f} B per view-sample)")
        if self.top1:
            top = np.asarray(self.top1) * 100
            out.append(f"teacher    top-1 per view mean {top.mean():.2f}%  min {top.min():.2f}%  max {top.max():.2f}%  "
                       f"mean confidence {100 * np.mean(self.confidence):.1f}%")
        return out


def inspect_cache(location: str) -> CacheReport:
    """Read a cache's attributes and compute per-view teacher accuracy and confidence on its finished views."""
    store = open_store(location)
    done = store.done()
    labels = store.labels()
    top1, conf = [], []
    for v in range(store.num_views):
        if not done[v].all():
            continue
        pred, confidence = store.predictions(v)
        top1.append(float((pred == labels).mean()))
        conf.append(float(confidence.mean()))
    return CacheReport(store, int(done.sum()), int(done.size), disk_bytes(location), top1, conf)
