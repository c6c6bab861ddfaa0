"""Stage one: run a teacher over replayable views and store its logits (loop), in work units of chunks (chunks),
written in the background (writer) or on dask (cluster).
"""

from kdcache.dump.loop import DumpSummary, dump_logits, dump_settings

__all__ = ["DumpSummary", "dump_logits", "dump_settings"]
