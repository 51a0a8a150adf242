"""Files in the cache: names that appear only when complete, ``.meta`` records of what was
verified, lock files, and errors that name the cache directory. ``fetch`` does the network part.

>>> with locked("/tmp/c/.locks/cpm1-new/vocab.txt.lock", "cpm1-new/vocab.txt"):   # doctest: +SKIP
...     write_meta("/tmp/c/cpm1-new/vocab.txt", 850, None, "http://127.0.0.1:8000/cpm1-new/vocab.txt")
"""
import errno
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Optional

from filelock import FileLock, Timeout
from tqdm import tqdm

__all__ = ["cache_error", "writing", "file_size", "remove", "sha256_of", "meta_path", "read_meta", "is_verified",
           "write_meta", "remove_empty_dir", "locked", "in_directory", "CHUNK_BYTES"]

logger = logging.getLogger("bminf.hub")

CHUNK_BYTES = 1 << 20


def cache_error(exc: OSError, path: str) -> OSError:
    """Turn a low-level OSError into one whose message names the cache directory and the fix."""
    directory = os.path.dirname(path)
    hint = "set BMINF_CACHE (or bminf.hub.set_cache_path) to another directory"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        msg = f"cache directory {directory} is not writable ({exc.strerror}); {hint}"
        return PermissionError(exc.errno, msg, path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"no space left in cache directory {directory} ({exc.strerror}); free space and run again "
               f"(bytes already in a .part file are kept and resumed), or {hint}")
        return OSError(exc.errno, msg, path)
    return OSError(exc.errno, f"cannot write to cache directory {directory} ({exc.strerror}); {hint}", path)


@contextmanager
def writing(path: str):
    # Only local file operations go in here: requests' exceptions are OSErrors too and must not be renamed.
    try:
        yield
    except OSError as exc:
        raise cache_error(exc, path) from exc


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def remove(path: str) -> None:
    with writing(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def sha256_of(path: str, limit: Optional[int] = None, progress: Optional[bool] = False):
    """A sha256 hasher fed with the first ``limit`` bytes of ``path`` (all of it when None)."""
    hasher = hashlib.sha256()
    remaining = file_size(path) if limit is None else limit
    if remaining == 0:
        return hasher
    disable = None if progress is None else not progress
    with open(path, "rb") as f, tqdm(total=remaining, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"Verifying {os.path.basename(path)}", disable=disable) as bar:
        while remaining > 0:
            block = f.read(min(CHUNK_BYTES, remaining))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)
            bar.update(len(block))
    return hasher


def meta_path(dest: str) -> str:
    return dest + ".meta"


def read_meta(dest: str) -> Optional[dict]:
    try:
        with open(meta_path(dest), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_verified(dest: str, sha256: Optional[str] = None) -> bool:
    """True when ``dest`` is a file this module verified and it still has the recorded size (no hashing)."""
    meta = read_meta(dest)
    if meta is None or not os.path.isfile(dest) or meta.get("size") != os.path.getsize(dest):
        return False
    return sha256 is None or meta.get("sha256") == sha256.lower()


def write_meta(dest: str, size: int, sha256: Optional[str], url: str) -> None:
    tmp = meta_path(dest) + ".tmp"
    with writing(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"size": size, "sha256": sha256, "url": url, "time": int(time.time())}, f)
        os.replace(tmp, meta_path(dest))


def remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:  # not empty (a .part kept for resuming, another file), or already gone
        pass


@contextmanager
def locked(lock_path: str, what: str):
    """Hold the lock file ``lock_path``; remove it (and its empty directories) when done.

    The holder deletes the file before releasing it, so a process that was waiting may end up
    holding a lock on a file that no longer has the name: it compares inodes and locks again."""
    while True:
        # Create the lock file ourselves first: FileLock's own error for a read-only directory is less clear.
        with writing(lock_path):
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another process removed the empty lock directory just now
                continue
        lock = FileLock(lock_path)
        try:
            try:
                lock.acquire(timeout=0.5)
            except Timeout:
                logger.warning("waiting for another process that is downloading %s (lock %s)", what, lock_path)
                lock.acquire()
        except FileNotFoundError:  # the holder removed the lock file and its directory: start again
            os.close(fd)
            continue
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        finally:
            os.close(fd)
        if same:
            break
        lock.release()
    try:
        yield
    finally:
        try:
            os.remove(lock_path)  # while still held: see above
        except OSError:  # Windows cannot remove an open file; the empty file stays, harmless
            pass
        lock.release()
        remove_empty_dir(os.path.dirname(lock_path))                   # .locks/<version>
        remove_empty_dir(os.path.dirname(os.path.dirname(lock_path)))  # .locks


@contextmanager
def in_directory(dest: str):
    """Create ``dest``'s directory; if the step fails and leaves it empty, remove it again."""
    directory = os.path.dirname(dest)
    with writing(dest):
        os.makedirs(directory, exist_ok=True)
    try:
        yield
    except BaseException:
        remove_empty_dir(directory)
        raise
