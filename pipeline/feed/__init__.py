"""Stage two's input: teacher rows read from a cache (logits), batches of views, labels and teacher logits (batches),
torchrun shards (ranks).
"""

from kdcache.feed.batches import Batch, DistillLoader, eval_loader
from kdcache.feed.logits import LogitFeed
from kdcache.feed.ranks import Ranks, init_ranks

__all__ = ["Batch", "DistillLoader", "LogitFeed", "Ranks", "eval_loader", "init_ranks"]
