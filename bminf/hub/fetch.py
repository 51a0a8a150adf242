"""Fetch one file into the cache: stream, resume, verify, lock. The public face is :mod:`bminf.hub`.

The cache holds either the complete, verified file at its final name or nothing there: bytes go
to ``<file>.part`` and are renamed into place only after the size and sha256 checks pass. A
``<file>.meta`` JSON beside it records what was verified, so later loads need no network call.

>>> fetch("http://127.0.0.1:8000/cpm1-new/vocab.txt", "/tmp/c/cpm1-new/vocab.txt",
...       lock_path="/tmp/c/.locks/cpm1-new/vocab.txt.lock")          # doctest: +SKIP
'/tmp/c/cpm1-new/vocab.txt'
"""
import errno
import logging
import os
import re
import shutil
import time
from typing import Callable, Optional, Tuple, Union

import requests
import urllib3
from tqdm import tqdm

from .cachefiles import (CHUNK_BYTES, cache_error, file_size, in_directory, is_verified, locked, meta_path,
                         read_meta, remove, sha256_of, write_meta, writing)

__all__ = ["fetch", "copy_local", "remote_sha256", "DownloadError", "IntegrityError", "SourceUnreachableError",
           "Timeouts", "is_verified", "read_meta", "meta_path"]

logger = logging.getLogger("bminf.hub")

Timeouts = Union[float, Tuple[float, float]]

RETRY_BACKOFF_S = 1.0  # first pause after a failed attempt that made no progress; doubles, capped at 30 s
MAX_ATTEMPTS = 1000  # hard stop even for a server that keeps dropping after a few new bytes
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)$")


class DownloadError(ConnectionError):
    """The source answered, but the file could not be fetched (HTTP error, transfer kept failing)."""


class IntegrityError(DownloadError):
    """The bytes received do not match the expected size or sha256; nothing was kept."""


class SourceUnreachableError(DownloadError):
    """No connection to the source could be made at all (offline, DNS, refused)."""


# ---------------------------------------------------------------- network


def _pause(failures: int) -> None:
    time.sleep(min(RETRY_BACKOFF_S * 2 ** (failures - 1), 30.0))


def remote_sha256(session: requests.Session, url: str, timeout: Timeouts, retries: int) -> Optional[str]:
    """The digest in ``<url>.sha256`` (``sha256sum`` format), or None when the server has none."""
    for failures in range(1, retries + 2):
        try:
            r = session.get(url + ".sha256", timeout=timeout)
        except requests.ConnectionError as exc:
            raise SourceUnreachableError(f"cannot connect to {url}: {exc}") from exc
        except requests.RequestException as exc:
            error = str(exc)
        else:
            if r.status_code == 200:
                token = r.text.split()[0] if r.text.split() else ""
                if _SHA256_RE.match(token):
                    return token.lower()
                logger.warning("ignoring %s.sha256: not a sha256 digest", url)
                return None
            if 400 <= r.status_code < 500 and r.status_code != 429:
                return None  # 404 (or 403 on some object stores): the checksum is simply unknown
            error = f"HTTP {r.status_code}"
        if failures <= retries:
            _pause(failures)
    raise DownloadError(f"cannot fetch {url}.sha256 after {retries} retries: {error}")


def _parse_content_range(value: str) -> Tuple[Optional[int], Optional[int]]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200)."""
    m = _CONTENT_RANGE_RE.match(value.strip())
    if m is None:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _adopt_existing(session, url: str, dest: str, part: str, sha256: Optional[str], timeout: Timeouts,
                    progress: Optional[bool], check: Optional[Callable[[str], None]] = None) -> bool:
    """A file at ``dest`` that we did not verify (BMInf 1.x download, manual copy): keep, resume or drop it.

    Returns True when ``dest`` is to be used as it is. BMInf 1.x wrote straight to the final name, so a
    smaller file is an interrupted download and becomes the ``.part`` to resume from.
    """
    try:
        r = session.head(url, timeout=timeout, allow_redirects=True)
    except requests.ConnectionError as exc:
        raise SourceUnreachableError(f"cannot connect to {url}: {exc}") from exc
    except requests.RequestException as exc:
        logger.warning("cannot check %s against %s (%s); using it as it is", dest, url, exc)
        return True
    length = r.headers.get("Content-Length")
    if r.status_code != 200 or length is None:
        logger.warning("cannot check %s against %s (HTTP %s); using it as it is", dest, url, r.status_code)
        return True
    local, remote = os.path.getsize(dest), int(length)
    if local == remote:
        digest = sha256_of(dest, progress=progress).hexdigest() if sha256 else None
        problem = None if digest == sha256 else "does not match the sha256 of"
        if problem is None and check is not None:
            try:
                check(dest)
            except ValueError as exc:
                problem = f"is the size of, but not a copy of ({exc})"
        if problem is None:
            write_meta(dest, local, digest, url)
            return True
        logger.warning("%s %s %s; downloading it again", dest, problem, url)
    elif local < remote and file_size(part) < local:
        logger.warning("%s is incomplete (%d of %d bytes); resuming it", dest, local, remote)
        with writing(part):
            os.replace(dest, part)
        return False
    remove(dest)
    return False


def _attempt(session, url: str, part: str, state: dict, timeout: Timeouts, bar_args: dict) -> str:
    """One GET from the current end of ``part``. Returns 'done', 'retry' or 'restart'; raises on HTTP errors."""
    offset = file_size(part)
    headers = {"Accept-Encoding": "identity"}  # byte counts must match Content-Length, so no gzip
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        state["answered"] = True
        if r.status_code == 416:  # nothing after offset: either part is already complete or it is too long
            _, total = _parse_content_range(r.headers.get("Content-Range", ""))
            state["total"] = total
            return "done" if total == offset else "restart"
        if r.status_code == 206:
            start, total = _parse_content_range(r.headers.get("Content-Range", ""))
            if start != offset:
                return "restart"
        elif r.status_code == 200:
            start, length = 0, r.headers.get("Content-Length")
            total = int(length) if length is not None else None
            if offset and total == offset:
                state["total"] = total
                return "done"  # server ignores Range, but part already has every byte; sha256 decides
        elif r.status_code >= 500 or r.status_code == 429:
            state["error"] = f"HTTP {r.status_code}"
            return "retry"
        else:
            raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}"
                                + (" (the source does not have this file)" if r.status_code == 404 else ""))
        state["total"] = total
        if state["size"] is not None and total is not None and total != state["size"]:
            raise IntegrityError(f"{url}: server reports {total} bytes, the registry expects {state['size']}")
        if total is not None:
            free = shutil.disk_usage(os.path.dirname(part)).free
            if free < total - start:
                raise cache_error(OSError(errno.ENOSPC, f"{total - start} bytes needed, {free} free"), part)
        if state["hashed"] != start:  # resuming a part from an earlier run: hash what is already there
            state["hasher"] = sha256_of(part, limit=start, progress=state["progress"])
            state["hashed"] = start
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, initial=start, **bar_args)
        else:  # a resumed attempt: the bar continues from the bytes already on disk
            bar.reset(total=total)
            bar.update(start)
        with writing(part):
            f = open(part, "ab" if start else "wb", buffering=0)
        try:
            # raw.read, not iter_content: it hands over the bytes received before a hang-up instead of
            # dropping them with the exception, so a resume starts after every byte that arrived
            while True:
                chunk = r.raw.read(CHUNK_BYTES, decode_content=False)  # raises urllib3 errors
                if not chunk:
                    break
                view = memoryview(chunk)
                with writing(part):
                    while view:
                        view = view[f.write(view):]
                state["hasher"].update(chunk)
                state["hashed"] += len(chunk)
                bar.update(len(chunk))
        finally:
            f.close()
    return "done"


def fetch(url: str, dest: str, *, lock_path: str, sha256: Optional[str] = None, size: Optional[int] = None,
          force: bool = False, timeout: Timeouts = (10.0, 60.0), retries: int = 5,
          progress: Optional[bool] = None, desc: str = "", check: Optional[Callable[[str], None]] = None) -> str:
    """Download ``url`` to ``dest`` unless a verified copy is there; returns ``dest``.

    ``sha256``/``size`` are known values (the registry's); without a sha256, ``<url>.sha256`` is asked for
    first, before anything is created in the cache. ``check(path)`` raises ValueError when the complete
    file is not what it should be (see ``bminf.hub.verify``). Dropped connections resume with HTTP Range;
    ``retries`` bounds consecutive attempts that add no bytes.
    Raises SourceUnreachableError (no connection at all, nothing changed), DownloadError (a partial
    ``.part`` may stay for resuming), IntegrityError (the ``.part`` is deleted), or OSError/PermissionError
    naming the cache directory. A failure leaves no empty directory and no lock file behind.
    """
    part = dest + ".part"
    known_sha256 = sha256
    with requests.Session() as session:
        # "answered": whether the source has replied, which tells "unreachable" from "transfer failed"
        answered = sha256 is None or os.path.isfile(dest)
        if sha256 is None:
            sha256 = remote_sha256(session, url, timeout, retries)
        with locked(lock_path, desc or dest), in_directory(dest):
            if force:
                remove(part)  # the cached file stays until its replacement is complete and verified
            elif is_verified(dest, known_sha256):
                return dest  # another process finished it while we waited for the lock
            if not force and os.path.isfile(dest) and _adopt_existing(session, url, dest, part, sha256, timeout,
                                                                      progress, check):
                return dest
            state = {"answered": answered, "size": size, "total": None, "hasher": None, "hashed": -1,
                     "error": "", "progress": progress}
            bar_args = dict(unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {desc}",
                            disable=None if progress is None else not progress)
            try:
                _transfer(session, url, part, state, timeout, retries, bar_args)
            finally:
                if state.get("bar") is not None:
                    state["bar"].close()
            return _finish(url, dest, part, sha256, state, check)


def copy_local(src: str, dest: str, *, lock_path: str, sha256: Optional[str] = None, force: bool = False,
               progress: Optional[bool] = None, desc: str = "", check: Optional[Callable[[str], None]] = None) -> str:
    """Copy ``src`` (a file of a ``file://`` mirror) into the cache with the checks of a download.

    The digest is the registry's ``sha256``, else the one in ``<src>.sha256`` if present.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"the mirror has no {os.path.basename(src)}: {src} does not exist")
    if sha256 is None and os.path.isfile(src + ".sha256"):
        with open(src + ".sha256", encoding="utf-8") as f:
            token = (f.read().split() or [""])[0]
        sha256 = token.lower() if _SHA256_RE.match(token) else None
    with locked(lock_path, desc or dest), in_directory(dest):
        if not force and is_verified(dest, sha256):
            return dest
        part = dest + ".part"
        with writing(part):
            shutil.copyfile(src, part)
        state = {"total": file_size(src), "hasher": None, "hashed": -1, "progress": progress}
        return _finish("file://" + src, dest, part, sha256, state, check)


def _transfer(session, url, part, state, timeout, retries, bar_args) -> None:
    # Progress means more bytes than the part ever held: re-fetching bytes lost to a restart does not
    # count, so a server that makes us restart forever still runs out of retries.
    failures, best = 0, file_size(part)
    for _ in range(MAX_ATTEMPTS):
        try:
            outcome = _attempt(session, url, part, state, timeout, bar_args)
        except requests.ConnectionError as exc:
            if not state["answered"]:
                raise SourceUnreachableError(f"cannot connect to {url}: {exc}") from exc
            outcome, state["error"] = "retry", str(exc)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:  # timeouts, broken streams
            outcome, state["error"] = "retry", str(exc)
        if outcome == "restart":
            remove(part)
            state["error"] = "the server's byte range did not continue the partial file"
        elif outcome == "done":
            total = state["total"]
            if total is None or file_size(part) >= total:
                return
            outcome, state["error"] = "retry", f"stream ended at byte {file_size(part)} of {total}"
        if file_size(part) > best:
            failures, best = 0, file_size(part)  # resume at once, this attempt does not count against the bound
            continue
        failures += 1
        if failures > retries:
            break
        _pause(failures)
    kept = f"; {file_size(part)} bytes are kept in {part} and the next try resumes" if file_size(part) else ""
    raise DownloadError(f"download of {url} failed after {retries} retries: {state['error']}{kept}")


def _finish(url: str, dest: str, part: str, sha256: Optional[str], state: dict,
            check: Optional[Callable[[str], None]] = None) -> str:
    received, total = file_size(part), state["total"]
    if total is not None and received != total:
        remove(part)
        raise IntegrityError(f"{url}: received {received} bytes but the server announced {total}; "
                             "partial file deleted")
    if state["hashed"] != received:
        state["hasher"] = sha256_of(part, progress=state["progress"])
    digest = state["hasher"].hexdigest()
    if sha256 is not None and digest != sha256:
        remove(part)
        raise IntegrityError(f"{url}: sha256 mismatch (expected {sha256}, got {digest}); partial file deleted, "
                             "run again to download it from scratch")
    if check is not None:
        try:
            check(part)
        except ValueError as exc:
            remove(part)
            raise IntegrityError(f"{url}: received {received} bytes, but {exc}; the file was deleted") from None
    with writing(part):
        with open(part, "rb") as f:
            os.fsync(f.fileno())  # the bytes reach the disk before the name says "complete"
        remove(meta_path(dest))  # describes the file being replaced
        os.replace(part, dest)
    write_meta(dest, received, digest, url)
    return dest
