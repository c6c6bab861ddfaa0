"""The cache: the Zarr store and its layout (cache), logit formats (formats), the rows it stores (rows), the checks
made before use (checks), verify and inspect, and sharing it: where it lies (locations), its manifest, reading it
where it lies (remote), pull, derive, publish and its card.
"""

from kdcache.store.cache import CacheStore, create_store, open_store, store_exists
from kdcache.store.checks import check_cache, open_checked
from kdcache.store.derive import DeriveSummary, derive_cache
from kdcache.store.formats import FULL, LogitFormat, TopKTeacher, parse_format
from kdcache.store.inspection import inspect_cache, inspect_caches, teacher_agreement
from kdcache.store.locations import default_cache_dir, use_cache_dir
from kdcache.store.manifest import Manifest, read_manifest, write_manifest
from kdcache.store.publish import PublishSummary, publish_cache
from kdcache.store.pull import PullSummary, pull_cache
from kdcache.store.remote import CorruptError, RemoteError
from kdcache.store.verify import VerifyReport, verify_cache

__all__ = [
    "FULL",
    "CacheStore",
    "CorruptError",
    "DeriveSummary",
    "LogitFormat",
    "Manifest",
    "PublishSummary",
    "PullSummary",
    "RemoteError",
    "TopKTeacher",
    "VerifyReport",
    "check_cache",
    "create_store",
    "default_cache_dir",
    "derive_cache",
    "inspect_cache",
    "inspect_caches",
    "open_checked",
    "open_store",
    "parse_format",
    "publish_cache",
    "pull_cache",
    "read_manifest",
    "store_exists",
    "teacher_agreement",
    "use_cache_dir",
    "verify_cache",
    "write_manifest",
]
