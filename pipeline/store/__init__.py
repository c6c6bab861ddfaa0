"""The cache: the Zarr store and its layout (cache), logit formats (formats), the checks made before use (checks),
verify and inspect.
"""

from kdcache.store.cache import CacheStore, create_store, open_store, store_exists
from kdcache.store.checks import check_cache, open_checked
from kdcache.store.formats import FULL, LogitFormat, TopKTeacher, parse_format
from kdcache.store.inspection import inspect_cache, inspect_caches, teacher_agreement
from kdcache.store.verify import VerifyReport, verify_cache

__all__ = [
    "FULL",
    "CacheStore",
    "LogitFormat",
    "TopKTeacher",
    "VerifyReport",
    "check_cache",
    "create_store",
    "inspect_cache",
    "inspect_caches",
    "open_checked",
    "open_store",
    "parse_format",
    "store_exists",
    "teacher_agreement",
    "verify_cache",
]
