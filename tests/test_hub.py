"""bminf.hub against a real HTTP server on 127.0.0.1 that injects faults.

After every test the `cache` fixture checks the invariant: a file at its final name holds exactly the
published bytes (never a truncated or corrupted copy), a .meta agrees with its file, and a .part kept
for resuming is a true prefix of the published bytes.
"""
import builtins
import errno
import hashlib
import json
import logging
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import pytest

import bminf.data
from bminf import cli, hub
from bminf.hub import fetch as hub_fetch
from bminf.hub import verify as hub_verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = "cpm1-new"
CKPT = "checkpoint.pt"
CKPT_PATH = f"/{V}/{CKPT}"
FAST = dict(timeout=2.0, retries=3, progress=False)
RELEASES = dict(hub_verify.RELEASES)  # the real table (tests replace it: their checkpoints are tiny trees)


# ---------------------------------------------------------------- the server


@dataclass
class Fault:
    status: int = 0  # answer with this HTTP status ...
    status_from: int = 0  # ... from this GET of the path on ...
    status_times: int = 10 ** 6  # ... for this many GETs
    drop_after: Optional[int] = None  # close the connection after this many body bytes ...
    drop_times: int = 10 ** 6  # ... in this many GETs
    length: Optional[int] = None  # announce this total (Content-Length / Content-Range) instead of the real one
    corrupt: bool = False  # flip one byte of the body
    delay: float = 0.0  # sleep before the headers ...
    delay_times: int = 10 ** 6  # ... in this many GETs
    stall: float = 0.0  # sleep after half of the body, once
    ranges: bool = True  # honour Range; False: always 200 with the whole file
    pace: float = 0.0  # sleep between 16 KiB chunks


@dataclass
class Server:
    url: str = ""
    files: Dict[str, bytes] = field(default_factory=dict)  # path -> bytes served
    faults: Dict[str, Fault] = field(default_factory=dict)
    log: List[Tuple[str, str, Optional[str]]] = field(default_factory=list)  # (method, path, Range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, version: str, name: str, data: bytes, sha: Optional[str] = "auto") -> None:
        self.files[f"/{version}/{name}"] = data
        if sha == "auto":
            sha = hashlib.sha256(data).hexdigest()
        if sha is not None:
            self.files[f"/{version}/{name}.sha256"] = f"{sha}  {name}\n".encode()

    def requests(self, path: str, method: str = "GET") -> List[Optional[str]]:
        """The Range headers of every request for ``path``."""
        return [rng for m, p, rng in self.log if p == path and m == method]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        state: Server = self.server.state
        path, rng = self.path.split("?")[0], self.headers.get("Range")
        with state.lock:
            n = len(state.requests(path, self.command))
            state.log.append((self.command, path, rng))
        fault = state.faults.get(path, Fault())
        if fault.delay and n < fault.delay_times:
            time.sleep(fault.delay)
        data = state.files.get(path)
        failing = fault.status and fault.status_from <= n < fault.status_from + fault.status_times
        status = fault.status if failing else (200 if data is not None else 404)
        if status != 200:
            return self._reply(status, f"error {status}".encode(), {}, body)
        if fault.corrupt:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        total = fault.length if fault.length is not None else len(data)
        headers, start = {}, 0
        if rng and fault.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{total}"}, body)
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{total}"
        payload = data[start:]
        length = total - start if fault.length is not None else len(payload)
        if fault.length is not None:
            headers["Connection"] = "close"  # the framing is a lie: never reuse this connection
            self.close_connection = True
        drop = fault.drop_after if fault.drop_after is not None and n < fault.drop_times else None
        self._reply(status, payload, headers, body, length=length, drop=drop, fault=fault, first=n == 0)

    def _reply(self, status, payload, headers, body, length=None, drop=None, fault=Fault(), first=False):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        self.end_headers()
        if not body:
            return
        if drop is not None:
            payload = payload[:drop]
        try:
            for i in range(0, len(payload), 16384):
                if fault.stall and first and i >= len(payload) // 2 > i - 16384:
                    time.sleep(fault.stall)
                self.wfile.write(payload[i:i + 16384])
                if fault.pace:
                    time.sleep(fault.pace)
        except OSError:  # the client gave up (timeout test): nothing to do
            self.close_connection = True
            return
        if drop is not None:  # hang up mid-file, as a flaky network would
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # broken pipes from deliberately abandoned requests
        pass


def _tree(k0: int, k1: int, rng: random.Random) -> bytes:
    """BMInf's checkpoint tree with two blocks ``layers.0``/``layers.1`` of one int8 tensor (k0, k1 bytes) each."""
    def text(t: str) -> bytes:
        return struct.pack("<I", len(t)) + t.encode()

    def param(k: int) -> bytes:
        return b"\x01" + struct.pack("<II", k, k) + b"\x00" + rng.randbytes(k)
    blocks = b"".join(text(str(i)) + struct.pack("<II", 1, 0) + text("weight") + param(k)
                      for i, k in enumerate((k0, k1)))
    return struct.pack("<II", 0, 1) + text("layers") + struct.pack("<II", 0, 2) + blocks


TREE_OVERHEAD = len(_tree(0, 0, random.Random(0)))


def _payload(n: int, seed: int) -> bytes:
    """``n`` random bytes that parse as BMInf's checkpoint tree (downloads check that)."""
    k = (n - TREE_OVERHEAD) // 2
    return _tree(k, n - TREE_OVERHEAD - k, random.Random(seed))


@pytest.fixture
def server():
    httpd = _HTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = Server(url=f"http://127.0.0.1:{httpd.server_address[1]}/")
    for seed, version in enumerate(hub.VERSIONS):
        httpd.state.publish(version, CKPT, _payload(200_000, seed))
        httpd.state.publish(version, "vocab.txt", "▁\n<unk>\n北京\n".encode() * 50)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for name in ("BMINF_SOURCE", "BMINF_CACHE", "BMINF_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_fetch, "RETRY_BACKOFF_S", 0.01)
    # the served checkpoints are tiny trees, not the released sizes: only their structure is checked here
    monkeypatch.setattr(hub_verify, "RELEASES", {})
    yield
    hub.set_source(None)
    hub.set_cache_path(None)
    hub.set_offline(None)


@pytest.fixture
def cache(tmp_path, server):
    root = tmp_path / "cache"
    yield str(root)
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(path, root)
            if rel.startswith("/.locks/") or os.path.islink(path):
                continue
            with open(path, "rb") as f:
                got = f.read()
            if name.endswith(".part"):
                assert server.files[rel[:-len(".part")]].startswith(got), f"{rel} is not a prefix of the file"
            elif name.endswith(".meta"):
                meta = json.loads(got)
                with open(path[:-len(".meta")], "rb") as f:
                    content = f.read()
                assert meta["size"] == len(content) and meta["sha256"] == hashlib.sha256(content).hexdigest()
            else:
                assert got == server.files[rel], f"{rel} at its final name differs from the published file"


def get(server, cache, name=CKPT, version=V, **kw):
    return hub.ensure_file(version, name, source=server.url, cache_dir=cache, **{**FAST, **kw})


def final(cache, name=CKPT, version=V):
    return os.path.join(cache, version, name)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- the happy path


def test_download_verifies_and_then_needs_no_network(server, cache):
    path = get(server, cache)
    assert path == final(cache) and read(path) == server.files[CKPT_PATH]
    assert not os.path.exists(path + ".part")
    assert server.requests(CKPT_PATH + ".sha256") == [None] and server.requests(CKPT_PATH) == [None]
    server.log.clear()
    assert get(server, cache) == path
    assert server.log == []  # a verified file is used without asking the server


def test_ensure_version_and_download_force(server, cache):
    directory = hub.ensure_version(V, source=server.url, cache_dir=cache, **FAST)
    assert sorted(os.listdir(directory)) == sorted([CKPT, CKPT + ".meta", "vocab.txt", "vocab.txt.meta"])
    assert read(os.path.join(directory, "vocab.txt")) == server.files[f"/{V}/vocab.txt"]
    hub.download(V, [CKPT], force=True, source=server.url, cache_dir=cache, **FAST)
    assert len(server.requests(CKPT_PATH)) == 2 and len(server.requests(f"/{V}/vocab.txt")) == 1


def test_force_keeps_the_cached_file_until_its_replacement_is_verified(server, cache):
    path = get(server, cache)
    good = read(path)
    with pytest.raises(hub.SourceUnreachableError, match="was kept"):
        hub.ensure_file(V, CKPT, source=_closed_port_url(), cache_dir=cache, force=True, **FAST)
    server.faults[CKPT_PATH] = Fault(status=404)
    with pytest.raises(hub.DownloadError):
        get(server, cache, force=True)
    assert read(path) == good and hub_fetch.is_verified(path, None)


def test_no_sha256_on_server_checks_size(server, cache):
    del server.files[CKPT_PATH + ".sha256"]  # a 404 for it means "unknown", not an error
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    meta = hub_fetch.read_meta(final(cache))
    assert meta["sha256"] == hashlib.sha256(server.files[CKPT_PATH]).hexdigest()


def test_registry_sha256_wins_over_the_server(server, cache, monkeypatch):
    good = hashlib.sha256(server.files[CKPT_PATH]).hexdigest()
    server.files[CKPT_PATH + ".sha256"] = b"0" * 64 + b"  checkpoint.pt\n"  # a wrong value on the server
    monkeypatch.setitem(hub.VERSIONS, V, (hub.RemoteFile(CKPT, sha256=good), hub.RemoteFile("vocab.txt")))
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert server.requests(CKPT_PATH + ".sha256") == []  # not even asked


# ---------------------------------------------------------------- dropped connections and resume


def test_dropped_connection_resumes_with_range(server, cache):
    server.faults[CKPT_PATH] = Fault(drop_after=70_000, drop_times=2)
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert server.requests(CKPT_PATH) == [None, "bytes=70000-", "bytes=140000-"]


def test_interrupted_run_leaves_a_prefix_that_the_next_run_resumes(server, cache):
    # first run: 50 kB arrive, then the server answers 503 to every retry until the run gives up
    server.faults[CKPT_PATH] = Fault(drop_after=50_000, drop_times=1, status=503, status_from=1)
    with pytest.raises(hub.DownloadError, match="kept in"):
        get(server, cache, retries=1)
    part = final(cache) + ".part"
    assert read(part) == server.files[CKPT_PATH][:50_000] and not os.path.exists(final(cache))
    server.faults.clear()
    server.log.clear()
    assert read(get(server, cache)) == server.files[CKPT_PATH]  # a later run (or process) resumes
    assert server.requests(CKPT_PATH) == ["bytes=50000-"] and not os.path.exists(part)


def test_server_ignoring_range_restarts_from_zero(server, cache):
    server.faults[CKPT_PATH] = Fault(drop_after=60_000, drop_times=1, ranges=False)
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert server.requests(CKPT_PATH) == [None, "bytes=60000-"]  # asked to resume, got the whole file


def test_connection_dropped_every_time_gives_up_after_bounded_tries(server, cache):
    server.faults[CKPT_PATH] = Fault(drop_after=0)
    with pytest.raises(hub.DownloadError, match="after 2 retries"):
        get(server, cache, retries=2)
    assert len(server.requests(CKPT_PATH)) == 3 and not os.path.exists(final(cache))


# ---------------------------------------------------------------- HTTP errors


def test_404_is_a_clear_error_and_leaves_nothing(server, cache):
    del server.files[CKPT_PATH]
    with pytest.raises(hub.DownloadError, match=r"404.*does not have this file") as info:
        get(server, cache)
    assert server.url + V + "/" + CKPT in str(info.value)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")
    assert len(server.requests(CKPT_PATH)) == 1  # a 404 is definitive: no retries


def test_500_is_retried_then_succeeds(server, cache):
    server.faults[CKPT_PATH] = Fault(status=500, status_times=2)
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert len(server.requests(CKPT_PATH)) == 3


def test_500_forever_fails_after_bounded_retries(server, cache):
    server.faults[CKPT_PATH] = Fault(status=500)
    with pytest.raises(hub.DownloadError, match="HTTP 500"):
        get(server, cache, retries=2)
    assert len(server.requests(CKPT_PATH)) == 3
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")


def test_500_for_the_checksum_fails_rather_than_skipping_verification(server, cache):
    server.faults[CKPT_PATH + ".sha256"] = Fault(status=500)
    with pytest.raises(hub.DownloadError, match="sha256"):
        get(server, cache, retries=1)
    assert server.requests(CKPT_PATH) == [] and not os.path.exists(final(cache))


# ---------------------------------------------------------------- wrong bytes


@pytest.mark.parametrize("with_sha", [True, False])
def test_content_length_larger_than_the_file(server, cache, with_sha):
    if not with_sha:
        del server.files[CKPT_PATH + ".sha256"]
    server.faults[CKPT_PATH] = Fault(length=len(server.files[CKPT_PATH]) + 1000)
    with pytest.raises(hub.DownloadError):
        get(server, cache, retries=2)
    assert not os.path.exists(final(cache))


def test_content_length_smaller_than_the_file_is_caught_by_sha256(server, cache):
    server.faults[CKPT_PATH] = Fault(length=len(server.files[CKPT_PATH]) - 1000)
    with pytest.raises(hub.IntegrityError, match="sha256 mismatch"):
        get(server, cache)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")


def test_corrupted_bytes_fail_sha256_and_are_deleted(server, cache):
    server.faults[CKPT_PATH] = Fault(corrupt=True)
    with pytest.raises(hub.IntegrityError, match="sha256 mismatch") as info:
        get(server, cache)
    assert isinstance(info.value, ConnectionError)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")
    server.faults.clear()  # the mirror is fixed: the next run downloads from scratch
    assert read(get(server, cache)) == server.files[CKPT_PATH]


def test_registry_size_mismatch_is_an_integrity_error(server, cache, monkeypatch):
    monkeypatch.setitem(hub.VERSIONS, V, (hub.RemoteFile(CKPT, size=123), hub.RemoteFile("vocab.txt")))
    with pytest.raises(hub.IntegrityError, match="registry expects 123"):
        get(server, cache)
    assert not os.path.exists(final(cache))


# ---------------------------------------------------------------- slow servers


def test_slow_response_times_out_then_retry_succeeds(server, cache):
    server.faults[CKPT_PATH] = Fault(delay=1.0, delay_times=1)
    start = time.monotonic()
    assert read(get(server, cache, timeout=0.3)) == server.files[CKPT_PATH]
    assert time.monotonic() - start < 1.0 and len(server.requests(CKPT_PATH)) == 2


def test_stall_mid_file_times_out_and_resumes(server, cache):
    server.faults[CKPT_PATH] = Fault(stall=1.0)
    assert read(get(server, cache, timeout=0.3)) == server.files[CKPT_PATH]
    ranges = server.requests(CKPT_PATH)
    assert len(ranges) == 2 and ranges[0] is None


def test_server_always_too_slow_fails_in_bounded_time(server, cache):
    server.faults[CKPT_PATH] = Fault(delay=1.0)
    start = time.monotonic()
    with pytest.raises(hub.DownloadError, match="timed out"):
        get(server, cache, timeout=0.2, retries=2)
    assert time.monotonic() - start < 3.0 and not os.path.exists(final(cache))


# ---------------------------------------------------------------- concurrent downloaders


def test_two_threads_download_once(server, cache, caplog):
    server.faults[CKPT_PATH] = Fault(pace=0.08)  # ~1 s for the file, so the two overlap
    barrier, results = threading.Barrier(2), []

    def worker():
        barrier.wait()
        results.append(get(server, cache))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="bminf.hub"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    assert results == [final(cache)] * 2 and read(final(cache)) == server.files[CKPT_PATH]
    assert len(server.requests(CKPT_PATH)) == 1  # the second waited for the lock, then found the file
    assert "waiting for another process" in caplog.text


def test_two_processes_download_once(server, cache):
    server.faults[CKPT_PATH] = Fault(pace=0.12)  # ~1.5 s: longer than starting a second interpreter
    # the served checkpoint is a tiny tree, not the release: check its structure only (as _isolated does)
    code = (f"from bminf import hub; hub.verify.RELEASES.clear(); "
            f"print(hub.ensure_file({V!r}, {CKPT!r}, progress=False))")
    env = {**os.environ, "PYTHONPATH": REPO, "BMINF_SOURCE": server.url, "BMINF_CACHE": cache}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out.strip() for out, _ in outs] == [final(cache)] * 2
    assert read(final(cache)) == server.files[CKPT_PATH]
    assert len(server.requests(CKPT_PATH)) == 1
    assert sum("waiting for another process" in err for _, err in outs) == 1


# ---------------------------------------------------------------- read-only and full caches


@pytest.fixture
def deny_writes(monkeypatch):
    """Simulate a read-only filesystem under a directory: as root, chmod would not stop anything.

    Every way hub code creates or changes files (mkdir, os.open for writing, open() for writing,
    rename) fails with the given errno for paths under ``root``; reads keep working.
    """
    def install(root: str, err: int = errno.EROFS):
        root = os.path.abspath(root) + os.sep
        real_mkdir, real_os_open, real_open, real_replace = os.mkdir, os.open, builtins.open, os.replace

        def under(path):
            return isinstance(path, (str, os.PathLike)) and (os.path.abspath(os.fspath(path)) + os.sep).startswith(root)

        def deny(path):
            raise OSError(err, os.strerror(err), os.fspath(path))

        def mkdir(path, *a, **k):
            return deny(path) if under(path) else real_mkdir(path, *a, **k)

        def os_open(path, flags, *a, **k):
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            return deny(path) if writing and under(path) else real_os_open(path, flags, *a, **k)

        def open_(path, mode="r", *a, **k):
            writing = any(c in mode for c in "wax+")
            return deny(path) if writing and under(path) else real_open(path, mode, *a, **k)

        def replace(src, dst, *a, **k):
            return deny(dst) if under(dst) else real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "replace", replace)
    return install


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_read_only_cache_is_a_clear_permission_error(server, cache, deny_writes, err):
    os.makedirs(cache)
    deny_writes(cache, err)
    with pytest.raises(PermissionError, match="not writable") as info:
        get(server, cache)
    assert cache in str(info.value) and "BMINF_CACHE" in str(info.value)
    assert os.listdir(cache) == []
    assert server.requests(CKPT_PATH) == []  # failed before downloading anything


def test_read_only_cache_with_the_file_already_there_just_works(server, cache, deny_writes):
    path = get(server, cache)
    deny_writes(cache)
    server.log.clear()
    assert get(server, cache) == path and server.log == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the simulated test")
def test_read_only_cache_with_real_permissions(server, cache):
    os.makedirs(cache)
    os.chmod(cache, 0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            get(server, cache)
    finally:
        os.chmod(cache, 0o755)
    assert os.listdir(cache) == []


def test_cache_path_blocked_by_a_file(server, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"x")
    with pytest.raises(OSError, match="cannot write to cache directory") as info:
        hub.ensure_file(V, CKPT, source=server.url, cache_dir=str(blocker / "cache"), **FAST)
    assert str(blocker) in str(info.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_mid_write_is_enospc(server, cache):
    # The kernel's real ENOSPC: the .part name points at /dev/full, where every write fails.
    os.makedirs(os.path.dirname(final(cache)))
    part = final(cache) + ".part"
    os.symlink("/dev/full", part)
    with pytest.raises(OSError, match="no space left") as info:
        get(server, cache)
    assert info.value.errno == errno.ENOSPC and os.path.dirname(part) in str(info.value)
    assert not os.path.exists(final(cache))
    os.remove(part)


def test_not_enough_free_space_fails_before_writing(server, cache, monkeypatch):
    usage = hub_fetch.shutil.disk_usage
    monkeypatch.setattr(hub_fetch.shutil, "disk_usage", lambda p: usage(p)._replace(free=1000))
    with pytest.raises(OSError, match="no space left") as info:
        get(server, cache)
    assert info.value.errno == errno.ENOSPC and "200000 bytes needed, 1000 free" in str(info.value)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")


# ---------------------------------------------------------------- offline and unreachable


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_offline_uses_the_cache_without_any_request(server, cache, monkeypatch):
    path = get(server, cache)
    os.remove(path + ".meta")  # even a file bminf did not verify (a manual copy) is used offline
    server.log.clear()
    monkeypatch.setenv("BMINF_OFFLINE", "yes")
    assert hub.ensure_file(V, CKPT, source=server.url, cache_dir=cache) == path
    assert server.log == []


def test_offline_with_nothing_cached_explains_the_fix(server, cache):
    hub.set_offline(True)
    with pytest.raises(hub.NotCachedError) as info:
        hub.ensure_file(V, CKPT, source=server.url, cache_dir=cache)
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for needle in (f"{V}/{CKPT}", final(cache), "BMINF_SOURCE", "copy the file", "python -m bminf download"):
        assert needle in msg
    assert server.log == []


def test_unreachable_source_with_nothing_cached(cache):
    with pytest.raises(hub.NotCachedError, match="unreachable") as info:
        hub.ensure_file(V, CKPT, source=_closed_port_url(), cache_dir=cache, **FAST)
    assert final(cache) in str(info.value)
    assert not os.path.exists(final(cache) + ".part")


def test_unreachable_source_uses_an_unverified_cached_file(server, cache):
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache), "wb") as f:  # e.g. downloaded by BMInf 1.x: no .meta
        f.write(server.files[CKPT_PATH])
    assert hub.ensure_file(V, CKPT, source=_closed_port_url(), cache_dir=cache, **FAST) == final(cache)


# ---------------------------------------------------------------- files from BMInf 1.x or copied by hand


def test_existing_complete_file_is_checked_by_head_not_downloaded(server, cache):
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache), "wb") as f:
        f.write(server.files[CKPT_PATH])
    assert get(server, cache) == final(cache)
    assert server.requests(CKPT_PATH, "HEAD") == [None] and server.requests(CKPT_PATH) == []
    assert hub_fetch.is_verified(final(cache))
    server.log.clear()
    get(server, cache)
    assert server.log == []


def test_existing_truncated_file_is_resumed(server, cache):
    # BMInf 1.x wrote straight to the final name: an interrupted download left a prefix there
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache), "wb") as f:
        f.write(server.files[CKPT_PATH][:30_000])
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert server.requests(CKPT_PATH) == ["bytes=30000-"]


def test_existing_corrupted_file_is_replaced(server, cache):
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache), "wb") as f:
        f.write(b"\0" * len(server.files[CKPT_PATH]))
    assert read(get(server, cache)) == server.files[CKPT_PATH]
    assert server.requests(CKPT_PATH) == [None]


# ---------------------------------------------------------------- settings, compat API, file://, errors


def test_env_vars_choose_source_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("BMINF_SOURCE", server.url.rstrip("/"))
    monkeypatch.setenv("BMINF_CACHE", str(tmp_path / "envcache"))
    assert hub.get_source() == server.url and hub.get_cache_path() == str(tmp_path / "envcache")
    path = hub.ensure_file(V, "vocab.txt", progress=False)
    assert path == str(tmp_path / "envcache" / V / "vocab.txt")
    hub.set_cache_path(str(tmp_path / "setter"))  # a setter wins over the environment
    assert hub.get_cache_path() == str(tmp_path / "setter")
    monkeypatch.setenv("BMINF_OFFLINE", "0")
    assert not hub.is_offline()
    hub.set_offline(True)
    assert hub.is_offline()


def test_data_module_keeps_the_1x_api(server, tmp_path):
    bminf.data.set_source(server.url.rstrip("/"))
    assert bminf.data.get_source() == server.url  # a trailing slash is added
    bminf.data.set_cache_path(str(tmp_path / "c"))
    assert bminf.data.get_cache_path() == str(tmp_path / "c")
    path = bminf.data.ensure_file(V, "vocab.txt")
    assert path == str(tmp_path / "c" / V / "vocab.txt")
    assert read(path) == server.files[f"/{V}/vocab.txt"]


def test_file_url_versions_read_a_local_directory(server, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "vocab.txt").write_text("a\n")
    version = f"file://{tmp_path / 'model'}"
    assert hub.ensure_file(version, "vocab.txt") == str(tmp_path / "model" / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model" / CKPT)):
        hub.ensure_version(version)
    (tmp_path / "model" / CKPT).write_bytes(b"w")
    assert hub.ensure_version(version) == str(tmp_path / "model")
    assert bminf.data.ensure_file(version, CKPT) == str(tmp_path / "model" / CKPT)
    assert server.log == []


def test_unknown_version_or_file_lists_what_exists(cache):
    with pytest.raises(ValueError, match="cpm1-new, cpm2.1-new, eva-int8-new"):
        hub.ensure_file("cpm3", CKPT, cache_dir=cache)
    with pytest.raises(ValueError, match="checkpoint.pt, vocab.txt"):
        hub.ensure_file(V, "model.bin", cache_dir=cache)
    with pytest.raises(ValueError, match="known versions"):
        hub.download("cpm1")  # the 0.0.x names are not served in this layout


# ---------------------------------------------------------------- command line


def _cli(*argv):
    return cli.main(list(argv))


def test_cli_download_and_list(server, cache, capsys):
    server.faults[CKPT_PATH] = Fault(drop_after=0, drop_times=1)  # the CLI resumes too
    assert _cli("download", V, "--source", server.url, "--cache-dir", cache, "--no-progress") == 0
    assert capsys.readouterr().out.strip() == f"{V}: {os.path.join(cache, V)}"
    with open(final(cache) + ".part", "wb") as f:  # a left-over partial file of a later forced run
        f.write(server.files[CKPT_PATH][:10])
    assert _cli("list", "--cache-dir", cache) == 0
    out = capsys.readouterr().out
    assert f"cache:  {cache}" in out
    assert re.search(r"cpm1-new\n  checkpoint.pt +195.3 KiB  verified\n", out)
    assert re.search(r"\n  checkpoint.pt +10 B  partial \(resume: python -m bminf download cpm1-new\)\n", out)
    assert re.search(r"\n  vocab.txt +850 B  verified\ncpm2.1-new\n  checkpoint.pt +not cached\n", out)


def test_cli_download_reports_errors_without_traceback(server, cache, capsys):
    assert _cli("download", "cpm9", "--cache-dir", cache) == 1
    assert capsys.readouterr().err.startswith("bminf download: error: unknown model version 'cpm9'")
    server.faults[CKPT_PATH] = Fault(status=404)
    assert _cli("download", V, "--source", server.url, "--cache-dir", cache, "--no-progress") == 1
    assert "404" in capsys.readouterr().err


def test_python_m_bminf_runs_the_cli(server, cache):
    assert _cli("download", V, "--source", server.url, "--cache-dir", cache, "--no-progress") == 0
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-m", "bminf", "list", "--cache-dir", cache], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert re.search(r"cpm1-new\n  checkpoint.pt +195.3 KiB  verified\n", run.stdout)


def test_hub_commands_do_not_import_torch(server, cache):
    # only checking a downloaded checkpoint.pt needs torch (to parse it); vocabularies and listing do not
    code = ("import sys; from bminf import hub; from bminf.cli import main; "
            f"hub.ensure_file({V!r}, 'vocab.txt', source={server.url!r}, cache_dir={cache!r}, progress=False); "
            f"main(['list', '--cache-dir', {cache!r}]); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "vocab.txt" in run.stdout and run.stdout.splitlines()[-1] == "False"


# ---------------------------------------------------------------- hardening (issue 9)


def _leftovers(cache):
    """Every directory and file under the cache (relative paths)."""
    out = []
    for dirpath, dirnames, names in os.walk(cache):
        out += [os.path.relpath(os.path.join(dirpath, n), cache) for n in dirnames + names]
    return sorted(out)


def test_download_without_network_leaves_no_directory_and_no_lock(cache):
    with pytest.raises(hub.NotCachedError, match="unreachable"):
        hub.ensure_version(V, source=_closed_port_url(), cache_dir=cache, **FAST)
    assert _leftovers(cache) == []


def test_failed_download_leaves_no_empty_directory_and_no_lock(server, cache, monkeypatch):
    monkeypatch.setitem(hub.VERSIONS, V, (hub.RemoteFile(CKPT, sha256="0" * 64), hub.RemoteFile("vocab.txt")))
    with pytest.raises(hub.NotCachedError, match="unreachable"):  # no .sha256 probe: the GET is the first contact
        hub.ensure_file(V, CKPT, source=_closed_port_url(), cache_dir=cache, **FAST)
    assert _leftovers(cache) == []
    del server.files[CKPT_PATH]
    with pytest.raises(hub.DownloadError, match="404"):
        get(server, cache)
    assert _leftovers(cache) == []
    assert get(server, cache, name="vocab.txt")  # a later download still works, and its lock is gone too
    assert _leftovers(cache) == [V, f"{V}/vocab.txt", f"{V}/vocab.txt.meta"]


def test_garbage_checkpoint_without_sha256_is_rejected(server, cache):
    server.publish(V, CKPT, random.Random(7).randbytes(100_000), sha=None)  # a mirror without .sha256
    del server.files[CKPT_PATH + ".sha256"]
    with pytest.raises(hub.IntegrityError, match=r"is not a BMInf checkpoint.*deleted"):
        get(server, cache)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")
    assert [f for f in hub.list_cached(cache) if f.name == CKPT] == []


def test_existing_garbage_checkpoint_is_not_adopted(server, cache):
    server.publish(V, CKPT, server.files[CKPT_PATH], sha=None)
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache), "wb") as f:  # the right size, the wrong bytes, and no sha256 to tell
        f.write(random.Random(3).randbytes(len(server.files[CKPT_PATH])))
    assert read(get(server, cache)) == server.files[CKPT_PATH]


def test_known_release_byte_totals_are_checked(server, cache, monkeypatch):
    data = server.files[CKPT_PATH]
    block = (len(data) - TREE_OVERHEAD) // 2  # the tree's two blocks hold one int8 tensor each
    monkeypatch.setattr(hub_verify, "RELEASES", {V: hub_verify.Release(total=2 * block, blocks={"layers": (2, block)})})
    assert read(get(server, cache)) == data
    os.remove(final(cache))
    os.remove(final(cache) + ".meta")
    monkeypatch.setattr(hub_verify, "RELEASES", {V: hub_verify.Release(total=2_679_040_000,
                                                                      blocks={"layers": (32, 78_755_840)})})
    with pytest.raises(hub.IntegrityError, match=r"2 blocks under 'layers' .*cpm1-new has 32 of 78755840 bytes"):
        get(server, cache)
    assert not os.path.exists(final(cache)) and not os.path.exists(final(cache) + ".part")
    monkeypatch.setattr(hub_verify, "RELEASES", {V: hub_verify.Release(total=2 * block + 1,
                                                                      blocks={"layers": (2, block)})})
    with pytest.raises(hub.IntegrityError, match=rf"{2 * block} bytes of tensors; cpm1-new has {2 * block + 1}"):
        get(server, cache)


def test_release_table_agrees_with_our_presets():
    torch = pytest.importorskip("torch")
    from bminf.models import GPT, GPT_PRESETS, GPTConfig, T5, T5_PRESETS, T5Config
    from bminf.quantization import quantize_

    def nbytes(module):  # tied tensors (CPM-1's LM head is its token embedding) are stored once
        tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.device("meta"):
        cpm1 = quantize_(GPT(GPTConfig(**GPT_PRESETS["cpm1"]))).half()
        cpm2 = quantize_(T5(T5Config(**T5_PRESETS["cpm2"]))).half()
        eva = quantize_(T5(T5Config(**T5_PRESETS["eva"]))).half()
    for version, model, lists in [("cpm1-new", cpm1, {"layers": "layers"}),
                                  ("cpm2.1-new", cpm2, {"enc_layers": "enc_layers", "dec_layers": "dec_layers"}),
                                  ("eva-int8-new", eva, {"enc_layers": "enc_layers", "dec_layers": "dec_layers"})]:
        release = RELEASES[version]
        for name, (count, size) in release.blocks.items():
            blocks = model.get_submodule(lists[name])
            assert len(blocks) == count and {nbytes(b) for b in blocks} == {size}, (version, name)
        assert release.total == nbytes(model), version


def test_set_source_refuses_other_schemes_and_accepts_file(tmp_path):
    cache = str(tmp_path / "cache-of-mirror")  # not the `cache` fixture: it holds the HTTP server's files
    with pytest.raises(ValueError, match=r"source 'ftp://x' .* http://, https:// or file://"):
        hub.set_source("ftp://x")
    with pytest.raises(ValueError, match="source"):
        hub.ensure_file(V, CKPT, source="mirror.example.com", cache_dir=cache)
    with pytest.raises(TypeError, match="source must be a str"):
        hub.set_source(5)
    mirror = tmp_path / "mirror"
    (mirror / V).mkdir(parents=True)
    (mirror / V / "vocab.txt").write_text("a\nb\n")
    (mirror / V / CKPT).write_bytes(_payload(5000, 1))
    hub.set_source(f"file://{mirror}")
    path = hub.ensure_file(V, CKPT, cache_dir=cache, progress=False)
    assert path == final(cache) and read(path) == _payload(5000, 1) and hub_fetch.is_verified(path)
    (mirror / V / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=str(mirror / V / "vocab.txt")):
        hub.ensure_file(V, "vocab.txt", cache_dir=cache)
    (mirror / V / CKPT).write_bytes(b"garbage" * 1000)
    with pytest.raises(hub.IntegrityError, match="is not a BMInf checkpoint"):
        hub.ensure_file(V, CKPT, cache_dir=cache, force=True, progress=False)
    assert read(path) == _payload(5000, 1)  # the verified copy was kept


@pytest.mark.parametrize("call, match", [
    (lambda: hub.ensure_version(None), "version must be a str, got NoneType None"),
    (lambda: hub.ensure_file(V, None), "filename must be a str, got NoneType None"),
    (lambda: hub.ensure_file(3, CKPT), "version must be a str, got int 3"),
    (lambda: hub.download(V, files=CKPT), "files must be a list of file names, got str"),
    (lambda: hub.set_cache_path(3), "path must be a str or os.PathLike, got int 3"),
    (lambda: hub.set_offline("yes"), "offline must be True, False or None, got str 'yes'"),
    (lambda: hub.list_cached(cache_dir=5), "cache_dir must be a str or os.PathLike, got int 5"),
    (lambda: hub.ensure_file(V, CKPT, retries="3"), "retries must be an int >= 0, got str '3'"),
    (lambda: hub.ensure_file(V, CKPT, timeout="10"), "timeout must be seconds or a"),
])
def test_hub_arguments_of_the_wrong_type_name_the_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_hub_numbers_out_of_range(capsys):
    with pytest.raises(ValueError, match="retries must be an int >= 0, got int -1"):
        hub.ensure_file(V, CKPT, retries=-1)
    with pytest.raises(ValueError, match="timeout must be positive"):
        hub.ensure_file(V, CKPT, timeout=(0, 5))
    for argv in (["download", V, "--retries", "-1"], ["download", V, "--timeout", "0"]):
        with pytest.raises(SystemExit) as exit_:
            _cli(*argv)
        assert exit_.value.code == 2 and "must be" in capsys.readouterr().err


def test_unknown_version_suggestion_is_accepted_by_the_cli(tmp_path, capsys):
    cache = str(tmp_path / "cache-of-mirror")
    with pytest.raises(ValueError) as info:
        hub.ensure_version("cpm9")
    assert "file://DIR" in str(info.value)
    model = tmp_path / "model"
    model.mkdir()
    (model / "vocab.txt").write_text("a\n")
    (model / CKPT).write_bytes(_payload(3000, 2))
    assert _cli("download", f"file://{model}", "--cache-dir", cache, "--no-progress") == 0
    assert capsys.readouterr().out.strip() == f"file://{model}: {model}"
    mirror = tmp_path / "mirror"
    (mirror / V).mkdir(parents=True)
    for name in (CKPT, "vocab.txt"):
        (mirror / V / name).write_bytes((model / name).read_bytes())
    assert _cli("download", V, "--source", f"file://{mirror}", "--cache-dir", cache, "--no-progress") == 0
    assert read(final(cache)) == _payload(3000, 2)


def test_list_shows_a_partial_file_once(server, cache, capsys):
    os.makedirs(os.path.dirname(final(cache)))
    with open(final(cache) + ".part", "wb") as f:
        f.write(server.files[CKPT_PATH][:10])
    assert _cli("list", "--cache-dir", cache) == 0
    out = capsys.readouterr().out
    assert out.count("checkpoint.pt") == 3  # one line per version: partial for cpm1-new, not cached for the others
    assert re.search(r"cpm1-new\n  checkpoint.pt +10 B  partial \(resume: python -m bminf download cpm1-new\)\n"
                     r"  vocab.txt +not cached\n", out)


def test_list_into_a_closed_pipe_ends_quietly(cache):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, "-m", "bminf", "list", "--cache-dir", cache], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `bminf list | head -0`: the reader is gone before anything is written
    err = p.stderr.read().decode()
    p.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
