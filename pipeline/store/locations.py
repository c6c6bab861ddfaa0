"""Where a cache lies: a local folder or a URL, the package (and kdcache extra) each URL scheme needs, which schemes
are read-only, and the local folder that keeps what remote reads fetched (``--cache-dir``)."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError, first_line

#: The single-writer lock file a dump keeps at the root of a local store.
LOCK_NAME = "kdcache.lock"
#: Per URL scheme: the kdcache extra that installs its filesystem, and the modules it needs.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "http": ("http", ("aiohttp", "requests")),
    "https": ("http", ("aiohttp", "requests")),
    "s3": ("s3", ("s3fs",)),
    "hf": ("hub", ("huggingface_hub",)),
}
#: Schemes kdcache only ever reads: a web server takes no writes.
READ_ONLY = ("http", "https")
#: The environment variable that overrides the default ``--cache-dir``.
CACHE_DIR_ENV = "KDCACHE_CACHE_DIR"


def is_url(path: str) -> bool:
    return "://" in path


def url_protocol(location: str | os.PathLike) -> str | None:
    """The scheme of a URL (``http``, ``s3``, ``hf``...), None for a local path (``file://`` included)."""
    s = str(location)
    if not is_url(s) or s.startswith("file://"):
        return None
    return s.split("://", 1)[0].split("::")[-1].lower()


def local_path(store: str | os.PathLike) -> Path | None:
    """The filesystem path of a local store (``file://`` URLs included), else None."""
    s = str(store)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return None if is_url(s) else Path(s)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_extra(location: str, flag: str) -> None:
    """Refuse a URL whose scheme needs a package that is not installed, naming the kdcache extra that installs it."""
    protocol = url_protocol(location)
    if protocol not in EXTRAS:
        return
    extra, modules = EXTRAS[protocol]
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise KdcacheError(
            f"{flag} {location}: {protocol}:// needs {' and '.join(missing)}, which kdcache[{extra}] installs: "
            f"pip install 'kdcache[{extra}]'"
        )


def check_url(location: str, flag: str) -> None:
    """Refuse a URL whose scheme fsspec does not know, or whose filesystem package (extra) is not installed."""
    import fsspec

    check_extra(location, flag)
    protocol = str(location).split("://", 1)[0].split("::")[-1]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise KdcacheError(
            f"{flag} {location}: unknown URL scheme {protocol}://; use a local path or one fsspec knows (s3://, "
            "http(s)://, hf://, gs://, memory://, ...)"
        ) from None
    except ImportError as exc:
        raise KdcacheError(f"{flag} {location} needs a package that is not installed: {first_line(exc)}") from None


def check_not_read_only(location: str, flag: str) -> None:
    """Refuse writing to a scheme kdcache only reads (a web server)."""
    protocol = url_protocol(location)
    if protocol in READ_ONLY:
        raise KdcacheError(
            f"{flag} {location}: {protocol}:// locations are read-only: write to a local folder (or s3://) and serve "
            "that folder"
        )


@dataclass(frozen=True)
class HubPath:
    """An ``hf://datasets/ORG/NAME[@REVISION]/PATH`` URL, parsed."""

    repo_id: str
    revision: str | None
    path: str


def parse_hub_url(url: str) -> HubPath:
    """The dataset repository, revision and path of an ``hf://`` cache URL; anything else is refused in one line."""
    rest = url.split("://", 1)[1] if "://" in url else url
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3 or parts[0] != "datasets":
        raise KdcacheError(
            f"{url}: a cache on the Hub lives in a dataset repository: use hf://datasets/ORG/NAME[@REVISION]/PATH"
        )
    name, _, revision = parts[2].partition("@")
    if not name or (revision == "" and "@" in parts[2]):
        raise KdcacheError(f"{url}: the repository name is empty or the revision after @ is missing")
    return HubPath(f"{parts[1]}/{name}", revision or None, "/".join(parts[3:]))


def default_cache_dir() -> Path:
    """Where remote reads keep what they fetched: ``$KDCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdcache``, else
    ``~/.cache/kdcache`` (as pip and Hugging Face keep theirs)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base).expanduser() / "kdcache"


def local_folder(path: Path, flag: str, hint: str = "") -> Path:
    """``path`` as a writable local folder (created if absent); one line naming ``flag`` when it cannot be."""
    if path.is_file():
        raise KdcacheError(f"{flag} {path} is a file: give a folder on a local disk")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdcacheError(
            f"{flag} {path} cannot be created ({exc.strerror or exc}): choose a folder you can write to{hint}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KdcacheError(f"{flag} {path} is not writable: choose a folder you can write to{hint}")
    return path


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` (or :func:`default_cache_dir`), created; one line when it cannot be."""
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return local_folder(path, "--cache-dir", f" (--cache-dir or {CACHE_DIR_ENV})")


@contextlib.contextmanager
def use_cache_dir(cache_dir: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, remote reads of this process and of the processes it starts (a sweep's students) keep what
    they fetch in ``cache_dir`` (None: leave the default as it is)."""
    if cache_dir is None:
        yield
        return
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(Path(cache_dir).expanduser().absolute())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_DIR_ENV, None)
        else:
            os.environ[CACHE_DIR_ENV] = before
