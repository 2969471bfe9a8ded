"""Download and unpack a small subset of the DNS Challenge 4 (ICASSP 2022) training data: clean read speech
plus noise, for training the denoiser with dataset.py / train.py.

    python download_dataset.py                       # default subset "small" into data/dns4
    python download_dataset.py --list                # archives, subsets and approximate sizes; no network
    python download_dataset.py --list --probe        # the same with exact byte counts asked from the server
    python download_dataset.py --subset noise --dest data/dns4

Layout produced under --dest (DEST):
    <dest>/clean/...   speech (read_speech/*.wav, 48 kHz WAV)  ->  dataset.py --speech <dest>/clean
    <dest>/noise/...   noise clips (48 kHz WAV)                ->  dataset.py --noise  <dest>/noise
    <dest>/dev/...     the challenge's dev test set (--subset dev)
    <dest>/archives/   downloads in progress (*.part) and a NAME.done marker per unpacked archive
The archives' own leading folders (datasets_fullband/, clean_fullband/, noise_fullband/) are dropped.

Behaviour: an interrupted download (network drop, Ctrl+C) keeps its .part file and the next run resumes it
with an HTTP Range request; a server that ignores Range makes it start again from zero. Every download is
checked against the length the server announced, failures are retried with exponential back-off, and an
archive already unpacked (NAME.done present) is skipped. Archives are unpacked with tarfile's 'data' filter
plus a refusal of absolute and '..' member names, into a staging folder inside <dest> that is moved into
place only when the whole archive passed, so a bad archive leaves nothing behind and nothing outside <dest>.

Edit the constants below (or pass the matching flags); the archive table ARCHIVES and SUBSETS say what each
subset fetches. Archive names follow the challenge's download-dns-challenge-4.sh.
"""
import argparse
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from http.client import HTTPException

try:
    from tqdm import tqdm
except ImportError:  # the one third-party import; say how to get it instead of a traceback
    sys.exit("error: tqdm is missing: pip install -r requirements.txt")

BASE_URL = "https://dns4public.blob.core.windows.net/dns4archive/datasets_fullband"  # challenge's Azure blob root
DEST = "data/dns4"            # where clean/, noise/ and archives/ go; relative to the current folder
SUBSET = "small"              # what to fetch: a key of SUBSETS (--list shows them)
RETRIES = 8                   # [0, 1000] failed attempts in a row before giving up; raise it on a flaky link
BACKOFF_S = 2.0               # [0, 10] s, first retry wait, doubled each retry; 0 retries at once
BACKOFF_MAX_S = 120.0         # [0, 600] s, cap on one retry wait
TIMEOUT_S = 60.0              # [0.1, 300] s, a connect or read that stalls this long counts as a failure
CHUNK_BYTES = 1 << 20         # [1024, 67108864] bytes asked per read; larger is faster, smaller gives finer progress
KEEP_ARCHIVES = False         # keep each .tar.bz2 after unpacking (doubles the disk use)
UNPACKED_RATIO = 1.7          # [1, 10] unpacked size / archive size, for the free-space check (1.5-2 for WAV in bz2)

# Archive name (path under BASE_URL) -> (folder under <dest>, approximate archive size in GB).
# The sizes are ESTIMATES: the challenge states ~550 GB archived for its 127 archives (~4.3 GB each) and
# 1.7 GB unpacked for the dev set; `--list --probe` prints the exact sizes the server reports.
ARCHIVES = {
    "clean_fullband/datasets_fullband.clean_fullband.read_speech_000_0.00_3.75.tar.bz2": ("clean", 4.3),
    "noise_fullband/datasets_fullband.noise_fullband.freesound_000.tar.bz2": ("noise", 4.3),
    "noise_fullband/datasets_fullband.noise_fullband.freesound_001.tar.bz2": ("noise", 4.3),
    "datasets_fullband.dev_testset_000.tar.bz2": ("dev", 1.0),
}
# Subset name -> (what it is for, archives). "small" is one speech and one noise archive: enough to train.
SUBSETS = {
    "small": ("one read-speech and one freesound noise archive", [
        "clean_fullband/datasets_fullband.clean_fullband.read_speech_000_0.00_3.75.tar.bz2",
        "noise_fullband/datasets_fullband.noise_fullband.freesound_000.tar.bz2",
    ]),
    "noise": ("both freesound noise archives", [
        "noise_fullband/datasets_fullband.noise_fullband.freesound_000.tar.bz2",
        "noise_fullband/datasets_fullband.noise_fullband.freesound_001.tar.bz2",
    ]),
    "dev": ("the challenge's dev test set", ["datasets_fullband.dev_testset_000.tar.bz2"]),
}
STRIP_PREFIXES = ("datasets_fullband", "clean_fullband", "noise_fullband")  # archive folders dropped on unpacking
RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}  # server-side hiccups worth another try
USER_AGENT = "download_dataset.py (noise suppressor project)"


class DownloadError(Exception):
    """A failure that ends the run; its text is the one line the user sees."""


class _Retry(Exception):
    """A failure that another attempt may cure (dropped connection, timeout, short body, 5xx)."""


class UnsafeMemberError(tarfile.FilterError):
    def __init__(self, member, why):
        self.tarinfo = member
        super().__init__(f"{member.name!r} {why}")


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _gb(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB"


def _parse_content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); total None for '*'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _reason(exc):
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _url(base_url, name):
    return f"{base_url.rstrip('/')}/{name}"


def _check_space(folder, need_bytes):
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise DownloadError(f"not enough free space in {folder}: need ~{_gb(need_bytes)}, have {_gb(free)}")


def _fetch_once(url, part, timeout_s, progress):
    """One HTTP attempt that extends (or restarts) `part`. Returns the announced total or None."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    name = os.path.basename(part)[:-len(".part")]
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            if total == have:  # the previous run got every byte but stopped before renaming
                return total
            os.remove(part)
            raise _Retry(f"server refused to resume at byte {have}; starting again from zero")
        if e.code in RETRY_HTTP_CODES:
            raise _Retry(f"HTTP {e.code} {e.reason}")
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}")
    except (OSError, HTTPException) as e:
        raise _Retry(_reason(e))
    with resp:
        if have and resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                os.remove(part)
                raise _Retry(f"server resumed at byte {start}, not {have}; starting again from zero")
            mode = "ab"
        else:
            if have:
                _log(f"{name}: server ignores Range requests; starting again from zero")
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            _check_space(os.path.dirname(part), total - have + int(UNPACKED_RATIO * total))
        # Unbuffered, so every byte received is on disk when Ctrl+C or a drop ends the attempt.
        with open(part, mode, buffering=0) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                      unit_divisor=1024, desc=name[-40:], disable=not progress,
                                                      file=sys.stderr, leave=False) as bar:
            while True:
                try:
                    chunk = resp.read1(CHUNK_BYTES)
                except (OSError, HTTPException) as e:
                    raise _Retry(f"connection lost after {have} bytes ({_reason(e)})")
                if not chunk:
                    break
                f.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if total is not None and have != total:
        raise _Retry(f"connection closed after {have} of {total} bytes")
    if total is None:
        _log(f"{name}: server sent no length, so {have} bytes could not be checked")
    return total


def fetch(url, path, retries=RETRIES, backoff_s=BACKOFF_S, timeout_s=TIMEOUT_S, progress=None):
    """Download url to path via path + '.part', resuming and retrying. Returns the final size in bytes.
    An existing `path` is taken as complete. Raises DownloadError (one-line text) when it gives up."""
    if os.path.exists(path):
        return os.path.getsize(path)
    if progress is None:
        progress = sys.stderr.isatty()
    part = path + ".part"
    failures = 0
    while True:
        before = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            _fetch_once(url, part, timeout_s, progress)
            os.replace(part, path)
            return os.path.getsize(path)
        except _Retry as e:
            after = os.path.getsize(part) if os.path.exists(part) else 0
            failures = 1 if after > before else failures + 1  # progress made: the link works, keep going
            if failures > retries:
                raise DownloadError(f"{os.path.basename(path)}: giving up after {retries} retries: {e}")
            wait = min(backoff_s * 2 ** (failures - 1), BACKOFF_MAX_S)
            _log(f"{os.path.basename(path)}: {e}; retry {failures}/{retries} in {wait:.0f} s")
            time.sleep(wait)


def _strip(name):
    """Drop the archive's own leading folders; '' for a member that is one of those folders."""
    parts = name.split("/")
    while parts and parts[0] in STRIP_PREFIXES:
        parts.pop(0)
    return "/".join(parts)


def _safe_member(member, dest):
    """tarfile filter: tarfile's 'data' filter, plus a refusal (instead of a silent fix) of absolute names
    and of any '..' component, applied after the leading folders are dropped."""
    name = _strip(member.name)
    if not name:
        return None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeMemberError(member, "is an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise UnsafeMemberError(member, "contains '..'")
    changes = {"name": name}
    if member.islnk():  # hard-link targets are archive paths, so they lose the same folders
        changes["linkname"] = _strip(member.linkname)
    return tarfile.data_filter(member.replace(**changes, deep=False), dest)


class _CountingReader:
    """File wrapper that advances a progress bar by compressed bytes read."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def _merge_into(src, dst):
    os.makedirs(dst, exist_ok=True)
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False) and os.path.isdir(target) and not os.path.islink(target):
            _merge_into(entry.path, target)
        else:
            os.replace(entry.path, target)


def extract(archive, out_dir, staging_root, progress=None):
    """Unpack archive (tar.bz2) into out_dir through a staging folder; nothing lands in out_dir unless every
    member passed the filter. Raises DownloadError naming the archive on an unsafe or damaged archive."""
    if progress is None:
        progress = sys.stderr.isatty()
    name = os.path.basename(archive)
    staging = os.path.join(staging_root, name)
    shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted run
    os.makedirs(staging)
    try:
        with open(archive, "rb") as raw, tqdm(total=os.path.getsize(archive), unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=f"unpack {name[-33:]}", leave=False,
                                              disable=not progress, file=sys.stderr) as bar:
            # Stream mode reads the bz2 once, front to back: no seeking through gigabytes of bz2.
            with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|bz2") as tar:
                tar.extractall(staging, filter=_safe_member)
        _merge_into(staging, out_dir)
    except tarfile.FilterError as e:
        raise DownloadError(f"refused to unpack {name}: unsafe member {e}; nothing was written")
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise DownloadError(f"{name} is damaged ({_reason(e)}); delete {archive} and run again")
    except OSError as e:  # disk full, permissions: name the archive, the cause is on this side
        raise DownloadError(f"cannot unpack {name}: {_reason(e)}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.rmdir(staging_root)
        except OSError:
            pass


def run(archives, dest, base_url, retries, backoff_s, timeout_s, keep_archives):
    arch_dir = os.path.join(dest, "archives")
    os.makedirs(arch_dir, exist_ok=True)
    for n, name in enumerate(archives, 1):
        kind, _ = ARCHIVES[name]
        base = os.path.basename(name)
        local = os.path.join(arch_dir, base)
        done = local + ".done"
        tag = f"[{n}/{len(archives)}] {base}"
        if os.path.exists(done):
            print(f"{tag}: already unpacked, skipped")
            continue
        print(f"{tag}: downloading" if not os.path.exists(local) else f"{tag}: already downloaded")
        size = fetch(_url(base_url, name), local, retries, backoff_s, timeout_s)
        print(f"{tag}: {_gb(size)} downloaded, unpacking into {os.path.join(dest, kind)}")
        extract(local, os.path.join(dest, kind), os.path.join(dest, ".staging"))
        with open(done, "w") as f:
            f.write(f"{size}\n")
        if not keep_archives:
            os.remove(local)
        print(f"{tag}: done")
    kinds = sorted({ARCHIVES[a][0] for a in archives})
    print("ready: " + ", ".join(os.path.join(dest, k) for k in kinds))
    if "clean" in kinds or "noise" in kinds:
        print(f"train on it with: --speech {os.path.join(dest, 'clean')} --noise {os.path.join(dest, 'noise')}")


def probe_size(url, timeout_s):
    """Exact size the server reports for url (HEAD), or raises DownloadError."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}")
    except (OSError, HTTPException) as e:
        raise DownloadError(_reason(e))
    if not (length and length.isdigit()):
        raise DownloadError("no Content-Length")
    return int(length)


def print_list(probe, base_url, timeout_s):
    failed = False
    print(f"{'size':>12}  {'into':<6} {'subsets':<12} archive (under {base_url})")
    for name, (kind, approx_gb) in ARCHIVES.items():
        subsets = ",".join(s for s, (_, names) in SUBSETS.items() if name in names)
        size = f"~{approx_gb:.1f} GB"
        if probe:
            try:
                size = f"{probe_size(_url(base_url, name), timeout_s)} B"
            except DownloadError as e:
                size, failed = "?", True
                _log(f"{name}: size unknown: {e}")
        print(f"{size:>12}  {kind:<6} {subsets:<12} {name}")
    print()
    for sub, (what, names) in SUBSETS.items():
        total = sum(ARCHIVES[a][1] for a in names)
        print(f"subset {sub:<6} ~{total:.1f} GB to download (~{total * UNPACKED_RATIO:.0f} GB unpacked): {what}")
    if not probe:
        print("sizes are estimates; add --probe to ask the server for exact ones")
    return 1 if failed else 0


def parse_args(argv=None):
    """The settings above that a user turns, as flags of the same name (dsp.add_constant_flags, as every script
    here); BACKOFF_MAX_S, CHUNK_BYTES and UNPACKED_RATIO stay constants to edit."""
    import dsp
    p = dsp.OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print archives, subsets and sizes, then exit")
    p.add_argument("--probe", action="store_true", help="with --list: exact sizes from the server (HEAD)")
    names = ["BASE_URL", "DEST", "SUBSET", "RETRIES", "BACKOFF_S", "TIMEOUT_S", "KEEP_ARCHIVES"]
    dsp.add_constant_flags(p, globals(), names, __file__)
    args = p.parse_args(argv)
    if args.subset not in SUBSETS:
        p.error(f"argument --subset: {args.subset!r} is not one of {', '.join(sorted(SUBSETS))}")
    if args.probe and not args.list:
        p.error("--probe only goes with --list")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        return print_list(args.probe, args.base_url, args.timeout_s)
    if not hasattr(tarfile, "data_filter"):
        _log("error: this Python lacks tarfile's safe extraction filters; use Python 3.11.4 or newer")
        return 1
    try:
        run(SUBSETS[args.subset][1], args.dest, args.base_url, args.retries, args.backoff_s, args.timeout_s,
            args.keep_archives)
    except DownloadError as e:
        _log(f"error: {e}")
        return 1
    except OSError as e:  # disk full, permission denied, ... on our side
        _log(f"error: {_reason(e)}")
        return 1
    except KeyboardInterrupt:
        _log("\ninterrupted: partial downloads are kept as .part files; run the same command again to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
