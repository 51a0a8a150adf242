"""Released model versions: where their files come from, where they are cached, and getting them there.

>>> from bminf import hub
>>> hub.ensure_version("cpm2.1-new")                     # doctest: +SKIP
'/root/.cache/bigmodels/cpm2.1-new'
>>> hub.ensure_file("file:///data/my-cpm2", "vocab.txt")  # a local directory, never downloaded  # doctest: +SKIP
'/data/my-cpm2/vocab.txt'

Files live at ``<source><version>/<file>`` and are cached at ``<cache>/<version>/<file>``, the same
layout as BMInf 1.x, so its downloads are reused. Each setting is taken from, in order: the argument
of the call, the setter (``set_source``, ``set_cache_path``, ``set_offline``), the environment
(``BMINF_SOURCE``, ``BMINF_CACHE``, ``BMINF_OFFLINE`` = 1/true/yes), the default.
A cached file that bminf verified is used with no network call at all; see ``bminf.hub.fetch``
for how downloads resume and are verified.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import fetch, verify
from .fetch import DownloadError, IntegrityError, SourceUnreachableError, Timeouts

__all__ = ["VERSIONS", "FILES", "LATEST", "RemoteFile", "CachedFile", "NotCachedError", "DownloadError",
           "IntegrityError", "SourceUnreachableError", "set_source", "get_source", "set_cache_path", "get_cache_path",
           "set_offline", "is_offline", "ensure_file", "ensure_version", "download", "list_cached", "DEFAULT_SOURCE",
           "DEFAULT_CACHE", "DEFAULT_TIMEOUT", "SCHEMES", "fetch", "verify"]

logger = logging.getLogger("bminf.hub")

DEFAULT_SOURCE = "https://thunlp.oss-cn-qingdao.aliyuncs.com/bminf/"
DEFAULT_CACHE = os.path.join("~", ".cache", "bigmodels")
DEFAULT_TIMEOUT = (10.0, 60.0)  # seconds: (connect, wait between two reads)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a released version; a known ``sha256``/``size`` wins over what the server says."""
    name: str
    sha256: Optional[str] = None
    size: Optional[int] = None


FILES = ("checkpoint.pt", "vocab.txt")  # what every version (and a file://DIR version) holds
# The BMInf server publishes no digests for these files, so none are pinned here: a mirror's
# <file>.sha256 is used when present, otherwise the size (Content-Length) is what gets checked.
VERSIONS: Dict[str, Tuple[RemoteFile, ...]] = {
    "cpm1-new": tuple(RemoteFile(name) for name in FILES),
    "cpm2.1-new": tuple(RemoteFile(name) for name in FILES),
    "eva-int8-new": tuple(RemoteFile(name) for name in FILES),
}
# model -> the version its class loads when none is given
LATEST = {"cpm1": "cpm1-new", "cpm2": "cpm2.1-new", "eva": "eva-int8-new"}


class NotCachedError(ConnectionError, FileNotFoundError):
    """A file is not cached and cannot be downloaded (offline mode, or the source is unreachable).

    It is both a ``ConnectionError`` (what BMInf 1.x raised here) and a ``FileNotFoundError``.
    """


# ---------------------------------------------------------------- settings


@dataclass
class _Settings:
    source: Optional[str] = None
    cache_path: Optional[str] = None
    offline: Optional[bool] = None


_settings = _Settings()  # what the setters chose; None means "ask the environment"


SCHEMES = ("http://", "https://", "file://")


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _check_str(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    return value


def _check_path(value, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__} {value!r}")
    return os.fspath(value)


def _check_source(url, origin: str = "source") -> str:
    """``url`` with a trailing slash, if it is an http(s):// URL or a file:// directory."""
    _check_str(url, "source")
    if not url.startswith(SCHEMES):
        raise ValueError(f"source {url!r} (from {origin}) must start with http://, https:// or file:// "
                         "(file://DIR: a local mirror holding DIR/<version>/<file>)")
    return _with_slash(url)


def set_source(url: Optional[str]) -> None:
    """Download from ``url`` (a mirror of ``<url><version>/<file>``: http://, https://, or file://DIR for a
    local directory); None goes back to BMINF_SOURCE/default.

    >>> set_source("http://mirror.example.com/bminf")    # doctest: +SKIP
    """
    _settings.source = None if url is None else _check_source(url, "set_source")


def get_source() -> str:
    """The base URL, with a trailing slash."""
    return _with_slash(_settings.source or os.environ.get("BMINF_SOURCE") or DEFAULT_SOURCE)


def set_cache_path(path: Optional[str]) -> None:
    """Cache files under ``path``; None goes back to BMINF_CACHE or ``~/.cache/bigmodels``."""
    _settings.cache_path = None if path is None else _check_path(path, "path")


def get_cache_path() -> str:
    """The absolute cache directory (it may not exist yet)."""
    path = _settings.cache_path or os.environ.get("BMINF_CACHE") or DEFAULT_CACHE
    return os.path.abspath(os.path.expanduser(path))


def set_offline(offline: Optional[bool]) -> None:
    """True: never touch the network, use only cached files. None goes back to BMINF_OFFLINE."""
    if offline is not None and not isinstance(offline, bool):
        raise TypeError(f"offline must be True, False or None, got {type(offline).__name__} {offline!r}")
    _settings.offline = offline


def is_offline() -> bool:
    if _settings.offline is not None:
        return _settings.offline
    return os.environ.get("BMINF_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------- files


def _check_version(version: str) -> None:
    _check_str(version, "version")
    if version not in VERSIONS and not version.startswith("file://"):
        raise ValueError(f"unknown model version {version!r}; known versions: {', '.join(VERSIONS)} "
                         "(or file://DIR, a local directory holding checkpoint.pt and vocab.txt; "
                         "a mirror of all versions is a source: --source file://DIR / set_source)")


def _check_options(timeout, retries) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int >= 0, got {type(retries).__name__} {retries!r}")
    if retries < 0:
        raise ValueError(f"retries must be an int >= 0, got int {retries}")
    values = timeout if isinstance(timeout, tuple) else (timeout,)
    if not 1 <= len(values) <= 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise TypeError(f"timeout must be seconds or a (connect, read) pair of seconds, got {timeout!r}")
    if any(v <= 0 for v in values):
        raise ValueError(f"timeout must be positive, got {timeout!r}")


def _lookup(version: str, filename: str) -> RemoteFile:
    _check_version(version)
    for remote in VERSIONS[version]:
        if remote.name == filename:
            return remote
    names = ", ".join(r.name for r in VERSIONS[version])
    raise ValueError(f"version {version} has no file {filename!r}; its files are: {names}")


def _local_dir(version: str) -> str:
    return os.path.expanduser(version[len("file://"):])


def _not_cached(version: str, filename: str, dest: str, source: str, reason: str) -> NotCachedError:
    return NotCachedError(
        f"{version}/{filename} is not cached and cannot be downloaded: {reason}.\n"
        f"  It is expected at {dest}\n"
        f"  To fix it, either\n"
        f"  - download it when online: python -m bminf download {version}\n"
        f"  - or point BMINF_SOURCE at a mirror that serves <mirror>/{version}/{filename}\n"
        f"  - or copy the file by hand to exactly {dest} (BMINF_OFFLINE=1 then uses it without any network call)")


def ensure_file(version: str, filename: str, *, source: Optional[str] = None, cache_dir: Optional[str] = None,
                offline: Optional[bool] = None, force: bool = False, timeout: Timeouts = DEFAULT_TIMEOUT,
                retries: int = 5, progress: Optional[bool] = None) -> str:
    """Local path of ``filename`` of ``version``, downloading it into the cache if needed.

    >>> ensure_file("cpm2.1-new", "vocab.txt")         # doctest: +SKIP
    '/root/.cache/bigmodels/cpm2.1-new/vocab.txt'

    ``version`` is a name from ``VERSIONS`` or ``file://DIR`` (read from DIR, never downloaded).
    ``progress`` None shows a bar only on a terminal. Raises ValueError (unknown version or file),
    FileNotFoundError (``file://`` path missing), NotCachedError (offline or unreachable, nothing
    cached), DownloadError/IntegrityError (the source failed or sent wrong bytes; nothing is left at
    the final name), PermissionError/OSError (the cache directory cannot be written or is full).
    """
    _check_str(version, "version")
    _check_str(filename, "filename")
    _check_options(timeout, retries)
    if version.startswith("file://"):
        path = os.path.join(_local_dir(version), filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{version}: no file {filename} at {path}")
        return path
    remote = _lookup(version, filename)
    source = _check_source(source, "source= / --source") if source is not None else \
        _check_source(get_source(), "set_source" if _settings.source else "BMINF_SOURCE")
    cache_dir = get_cache_path() if cache_dir is None else _check_path(cache_dir, "cache_dir")
    dest = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), version, filename)
    if offline if offline is not None else is_offline():
        if force:
            raise ValueError("force=True needs the network, but offline mode is on")
        if os.path.isfile(dest):
            return dest
        raise _not_cached(version, filename, dest, source, "offline mode is on (BMINF_OFFLINE / set_offline)")
    if not force and fetch.is_verified(dest, remote.sha256):
        return dest
    lock_path = os.path.join(os.path.dirname(os.path.dirname(dest)), ".locks", version, filename + ".lock")
    check = verify.checker(version, filename)
    if source.startswith("file://"):
        return fetch.copy_local(os.path.join(_local_dir(source), version, filename), dest, lock_path=lock_path,
                                sha256=remote.sha256, force=force, progress=progress,
                                desc=f"{version}/{filename}", check=check)
    try:
        return fetch.fetch(
            source + version + "/" + filename, dest,
            lock_path=lock_path, sha256=remote.sha256, size=remote.size, force=force, timeout=timeout,
            retries=retries, progress=progress, desc=f"{version}/{filename}", check=check)
    except SourceUnreachableError as exc:
        if os.path.isfile(dest) and not force:
            logger.warning("%s is unreachable; using the cached %s as it is", source, dest)
            return dest
        if os.path.isfile(dest):
            raise SourceUnreachableError(f"{source} is unreachable ({exc}); the cached {dest} was kept as it is") \
                from exc
        raise _not_cached(version, filename, dest, source, f"the source is unreachable ({exc})") from exc
    except PermissionError:
        if os.path.isfile(dest) and not force:
            logger.warning("the cache is read-only; using %s without checking it against %s", dest, source)
            return dest
        raise


def download(version: str, files: Optional[Sequence[str]] = None, *, force: bool = False, **options) -> str:
    """Make every file of ``version`` (or just ``files``) cached and verified; returns its directory.

    >>> download("eva-int8-new", force=True)          # doctest: +SKIP
    '/root/.cache/bigmodels/eva-int8-new'

    ``force`` downloads again even when cached. ``options`` are those of ``ensure_file``.
    """
    _check_version(version)
    if isinstance(files, str) or not (files is None or isinstance(files, (list, tuple))):
        raise TypeError(f"files must be a list of file names, got {type(files).__name__} {files!r}")
    names = files or [r.name for r in VERSIONS.get(version, ())] or list(FILES)
    paths = [ensure_file(version, name, force=force, **options) for name in names]
    return os.path.dirname(paths[0])


def ensure_version(version: str, **options) -> str:
    """Directory holding ``checkpoint.pt`` and ``vocab.txt`` of ``version``, downloading what is missing.

    >>> ensure_version("file:///data/my-cpm2")       # doctest: +SKIP
    '/data/my-cpm2'
    """
    return download(version, **options)


@dataclass(frozen=True)
class CachedFile:
    """A file found in the cache. ``status``: 'verified', 'unverified' (not checked by bminf) or 'partial'."""
    version: str
    name: str
    path: str
    size: int
    status: str


def list_cached(cache_dir: Optional[str] = None) -> List[CachedFile]:
    """Every file in the cache, known versions or not, sorted by version and name.

    >>> [(f.version, f.name, f.status) for f in list_cached()]   # doctest: +SKIP
    [('cpm2.1-new', 'checkpoint.pt', 'verified'), ('cpm2.1-new', 'vocab.txt', 'verified')]
    """
    cache_dir = get_cache_path() if cache_dir is None else _check_path(cache_dir, "cache_dir")
    root = os.path.abspath(os.path.expanduser(cache_dir))
    found = []
    versions = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for version in versions:
        directory = os.path.join(root, version)
        if version.startswith(".") or not os.path.isdir(directory):
            continue  # .locks holds lock files only
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if not os.path.isfile(path) or name.endswith((".meta", ".meta.tmp")):
                continue
            if name.endswith(".part"):
                name, status = name[:-len(".part")], "partial"
            else:
                status = "verified" if fetch.is_verified(path) else "unverified"
            found.append(CachedFile(version, name, path, os.path.getsize(path), status))
    return found


def __dir__():
    # the public names only: not os, logging or the settings object
    return sorted(__all__)
