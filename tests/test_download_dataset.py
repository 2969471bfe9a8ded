"""download_dataset.py against a real HTTP server on 127.0.0.1 (http.server in a thread, random port) that
serves small tar.bz2 archives made here under the real DNS archive names. No test touches the internet.

    python -m pytest -q tests/test_download_dataset.py
"""
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import download_dataset as dd  # noqa: E402

CLEAN = "clean_fullband/datasets_fullband.clean_fullband.read_speech_000_0.00_3.75.tar.bz2"
NOISE = "noise_fullband/datasets_fullband.noise_fullband.freesound_000.tar.bz2"
DEV = "datasets_fullband.dev_testset_000.tar.bz2"


# ---------------------------------------------------------------- local server

class FileServer:
    """In-memory files over HTTP/1.1. Per path, `drops` lists, for successive GETs, the byte count after
    which the connection is closed (None: send it all; the last entry repeats). `stall` = (name, n) sends
    n bytes of that archive and then hangs until `release` is set. honour_range False answers every Range
    request with the whole file (200), like a server without Range support."""

    def __init__(self):
        self.files, self.drops, self.log = {}, {}, []
        self.honour_range = True
        self.stall = None
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dns4archive/datasets_fullband"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def put(self, name, data):
        self.files["/dns4archive/datasets_fullband/" + name] = data

    def gets(self, name=None):
        return [e for e in self.log if e[0] == "GET" and (name is None or e[1].endswith("/" + name))]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        st = self.server.state
        data = st.files.get(self.path)
        rng = self.headers.get("Range")
        if data is None:
            st.log.append((self.command, self.path, rng, 404))
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and st.honour_range:
            start, status = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)), 206
            if start >= len(data):
                st.log.append((self.command, self.path, rng, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        st.log.append((self.command, self.path, rng, status))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if st.honour_range else "none")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cuts = st.drops.get(self.path)
        cut = (cuts.pop(0) if len(cuts) > 1 else cuts[0]) if cuts else None
        if st.stall and self.path.endswith("/" + st.stall[0]):
            self.wfile.write(body[:st.stall[1]])
            self.wfile.flush()
            st.release.wait(15)
            self.close_connection = True
        elif cut is not None:
            self.wfile.write(body[:cut])
            self.close_connection = True  # the server closes the socket: the client sees a short body
        else:
            self.wfile.write(body)


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


# ---------------------------------------------------------------- archives and helpers

def wav_bytes(seed, seconds=0.05, rate=48000):
    audio = np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * rate)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_tar_bz2(entries):
    """entries: (name, bytes) for a file, (name, None) for a folder, (name, '->target') for a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


CLEAN_FILES = {"read_speech/book_00001_chp_0001_reader_00001_0.wav": wav_bytes(1),
               "read_speech/book_00002_chp_0003_reader_00007_4.wav": wav_bytes(2)}
NOISE_FILES = {"door_slam_1.wav": wav_bytes(3), "fan/hum_2.wav": wav_bytes(4)}


def clean_archive():
    return make_tar_bz2([("datasets_fullband", None), ("datasets_fullband/clean_fullband", None),
                         ("datasets_fullband/clean_fullband/read_speech", None)]
                        + [("datasets_fullband/clean_fullband/" + k, v) for k, v in CLEAN_FILES.items()])


def noise_archive():
    return make_tar_bz2([("datasets_fullband/noise_fullband/" + k, v) for k, v in NOISE_FILES.items()])


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, str(ROOT / "download_dataset.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def fast(server, dest):
    return ["--base-url", server.url, "--dest", str(dest), "--backoff-s", "0", "--timeout-s", "5"]


def lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def tree(folder, skip=None):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if skip is None or skip not in p.parents and p != skip)


# ---------------------------------------------------------------- tests

def test_download_and_unpack_small_subset(server, tmp_path):
    server.put(CLEAN, clean_archive())
    server.put(NOISE, noise_archive())
    dest = tmp_path / "dns4"
    r = cli(*fast(server, dest))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for rel, data in CLEAN_FILES.items():
        assert (dest / "clean" / rel).read_bytes() == data
    for rel, data in NOISE_FILES.items():
        assert (dest / "noise" / rel).read_bytes() == data
    assert sf.info(str(dest / "clean" / next(iter(CLEAN_FILES)))).samplerate == 48000
    # only the documented layout: no archive folders kept, no staging or .part left, archives deleted
    assert sorted(p.name for p in dest.iterdir()) == ["archives", "clean", "noise"]
    assert sorted(p.name for p in (dest / "archives").iterdir()) == sorted(
        os.path.basename(a) + ".done" for a in (CLEAN, NOISE))
    assert f"--speech {dest / 'clean'} --noise {dest / 'noise'}" in r.stdout


def test_second_run_skips_finished_archives(server, tmp_path):
    server.put(CLEAN, clean_archive())
    server.put(NOISE, noise_archive())
    dest = tmp_path / "dns4"
    assert cli(*fast(server, dest)).returncode == 0
    n_requests = len(server.log)
    r = cli(*fast(server, dest))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already unpacked, skipped") == 2
    assert len(server.log) == n_requests  # nothing fetched again
    assert (dest / "clean" / next(iter(CLEAN_FILES))).read_bytes() == next(iter(CLEAN_FILES.values()))


def test_dropped_connection_resumes_with_range(server, tmp_path):
    payload = os.urandom(100_000)
    server.put(DEV, payload)
    server.drops[f"/dns4archive/datasets_fullband/{DEV}"] = [30_000, None]  # first GET cut after 30 kB
    out = tmp_path / "a.tar.bz2"
    assert dd.fetch(f"{server.url}/{DEV}", str(out), retries=3, backoff_s=0, timeout_s=5, progress=False) == 100_000
    assert out.read_bytes() == payload
    assert not (tmp_path / "a.tar.bz2.part").exists()
    assert [(g[2], g[3]) for g in server.gets(DEV)] == [(None, 200), ("bytes=30000-", 206)]


def test_server_without_range_restarts_from_zero(server, tmp_path, capsys):
    payload = os.urandom(100_000)
    server.put(DEV, payload)
    server.honour_range = False
    server.drops[f"/dns4archive/datasets_fullband/{DEV}"] = [30_000, None]
    out = tmp_path / "a.tar.bz2"
    dd.fetch(f"{server.url}/{DEV}", str(out), retries=3, backoff_s=0, timeout_s=5, progress=False)
    assert out.read_bytes() == payload  # not the first 30 kB twice
    assert [(g[2], g[3]) for g in server.gets(DEV)] == [(None, 200), ("bytes=30000-", 200)]
    assert "starting again from zero" in capsys.readouterr().err


def test_complete_part_file_is_accepted_on_416(server, tmp_path):
    payload = os.urandom(5000)
    server.put(DEV, payload)
    out = tmp_path / "a.tar.bz2"
    (tmp_path / "a.tar.bz2.part").write_bytes(payload)  # a run stopped between last byte and rename
    dd.fetch(f"{server.url}/{DEV}", str(out), retries=0, backoff_s=0, timeout_s=5, progress=False)
    assert out.read_bytes() == payload
    assert [g[3] for g in server.gets(DEV)] == [416]


def test_short_body_every_time_gives_up_with_one_line(server, tmp_path):
    server.put(DEV, os.urandom(10_000))
    server.honour_range = False
    server.drops[f"/dns4archive/datasets_fullband/{DEV}"] = [3000]  # every GET cut after 3000 bytes
    dest = tmp_path / "d"
    r = cli(*fast(server, dest), "--subset", "dev", "--retries", "2")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = lines(r.stderr)[-1]
    assert last.startswith("error: ") and "giving up" in last and "3000 of 10000 bytes" in last
    assert (dest / "archives" / (DEV + ".part")).stat().st_size == 3000  # kept for a later resume
    assert not (dest / "dev").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery to a child differs on Windows")
def test_ctrl_c_keeps_part_file_and_next_run_resumes(server, tmp_path):
    member = os.urandom(300_000)  # random bytes do not compress: the archive stays ~300 kB
    server.put(DEV, make_tar_bz2([("datasets_fullband/dev_testset/clip.wav", member)]))
    server.stall = (DEV, 100_000)
    dest = tmp_path / "d"
    part = dest / "archives" / (DEV + ".part")
    proc = subprocess.Popen([sys.executable, str(ROOT / "download_dataset.py"), *fast(server, dest),
                             "--subset", "dev"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (part.exists() and part.stat().st_size == 100_000):
            assert time.monotonic() < deadline and proc.poll() is None, "download never reached the stall"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert part.stat().st_size == 100_000
    server.stall = None
    server.release.set()
    r = cli(*fast(server, dest), "--subset", "dev")
    assert r.returncode == 0, r.stderr
    assert server.gets(DEV)[-1][2:] == ("bytes=100000-", 206)
    assert (dest / "dev" / "dev_testset" / "clip.wav").read_bytes() == member


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink-relative", "symlink-absolute"])
def test_malicious_archive_is_refused_and_writes_nothing(server, tmp_path, attack):
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    good = ("datasets_fullband/dev_testset/ok.wav", wav_bytes(5))
    bad = {
        "dotdot": [("../../../evil.txt", b"pwned")],  # from <dest>/.staging/<archive>/ to tmp_path/evil.txt
        "absolute": [(str(outside / "abs_evil.txt"), b"pwned")],
        "symlink-relative": [("datasets_fullband/dev_testset/esc", "->../../../../outside"),
                             ("datasets_fullband/dev_testset/esc/pwned.txt", b"pwned")],
        "symlink-absolute": [("datasets_fullband/dev_testset/esc", "->" + str(outside)),
                             ("datasets_fullband/dev_testset/esc/pwned.txt", b"pwned")],
    }[attack]
    server.put(DEV, make_tar_bz2([good] + bad))
    before = tree(tmp_path)
    r = cli(*fast(server, dest), "--subset", "dev")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("error: refused to unpack " + DEV), r.stderr
    assert tree(tmp_path, skip=dest) == before  # nothing new outside dest
    assert sorted(tree(dest)) == ["archives", "archives/" + DEV]  # not even the good member, no staging


def test_list_prints_names_and_sizes():
    r = cli("--list")
    assert r.returncode == 0, r.stderr
    for name, (kind, gb) in dd.ARCHIVES.items():
        row = next(ln for ln in r.stdout.splitlines() if ln.endswith(name))
        assert f"~{gb:.1f} GB" in row and kind in row
    for sub in dd.SUBSETS:
        assert re.search(rf"subset {sub}\s+~\d+\.\d GB", r.stdout)


def test_list_probe_prints_exact_sizes_and_flags_missing(server):
    sizes = {}
    for i, name in enumerate(dd.ARCHIVES):
        if name != DEV:  # left missing: the server answers 404
            sizes[name] = 1000 + 37 * i
            server.put(name, os.urandom(sizes[name]))
    r = cli("--list", "--probe", "--base-url", server.url)
    assert r.returncode == 1
    for name, n in sizes.items():
        assert re.search(rf"\b{n} B\s.*{re.escape(name)}$", r.stdout, re.M)
    assert lines(r.stderr) == [f"{DEV}: size unknown: HTTP 404 Not Found"]
    assert {e[0] for e in server.log} == {"HEAD"}  # probing downloads nothing


def test_unreachable_server_and_missing_file_give_one_line(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    r = cli("--base-url", f"http://127.0.0.1:{closed_port}/x", "--dest", str(tmp_path / "a"), "--retries", "0",
            "--subset", "dev")
    assert r.returncode == 1
    assert len(lines(r.stderr)) == 1 and lines(r.stderr)[0].startswith("error: ")
    assert "Connection" in r.stderr and "Traceback" not in r.stderr

    r = cli(*fast(server, tmp_path / "b"), "--subset", "dev")  # server has no files: 404, not retried
    assert r.returncode == 1
    assert lines(r.stderr) == [f"error: {server.url}/{DEV}: HTTP 404 Not Found"]
    assert len(server.gets(DEV)) == 1
