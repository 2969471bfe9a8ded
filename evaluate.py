"""Score this project's denoisers against the noisy input and against peer denoisers (peers.py).

Every method runs on every noisy file; its output is aligned to the clean reference by cross-correlation (the
measured lag is reported) and scored (metrics.py) with PESQ wide-band, STOI, SI-SNR improvement over the noisy
input and DNSMOS P.835 (SIG/BAK/OVRL), plus real-time factor on one CPU core and the method's algorithmic
latency. Writes a Markdown table (mean and 95% interval), a CSV of per-file scores and PNG charts.

    python evaluate.py --sets dev dev_real --readme README.md   # the README's tables: both dev sets, all methods
    python evaluate.py --clean ../shared/data/dev/clean --noisy ../shared/data/dev/noisy
    python evaluate.py --clean C --noisy N --limit 4 --methods noisy,ml,gtcrn --by-snr
    python evaluate.py --noisy recordings/          # real recordings without references: DNSMOS and RTF only
    python evaluate.py --clean C --noisy N --cmd mytool "mytool --in {in} --out {out}"
    python evaluate.py --clean C --noisy N --ml-variant "ml-noeq=--no-eq"   # what a default costs

Pairs are matched by file name. --sets takes SETS' names (../shared/data/dev and dev_real) or NAME=FOLDER, each
a folder with clean/ and noisy/, one table each. --by-snr breaks results down by SNR taken from names ending in
_snrN or from manifest.csv (column snr_db) beside the clean folder. Outputs go to --out (eval_out/).

Install the peers and metrics (no torch needed; the second line keeps huge or CUDA dependencies out):
    pip install -r requirements-eval.txt
    pip install --no-deps -r requirements-eval-nodeps.txt
A peer that is not installed is skipped with a note. To add one, write a setup function in peers.py and list it
in peers.PEERS, or pass --cmd.
"""
import os

# RTF is defined on one thread: the BLAS/OpenMP pools must be sized before numpy loads.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import csv
import importlib
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import peers
from metrics import CONFIDENCE, DNSMOS_LEVEL_DBFS, MAX_LAG_MS, SAMPLE_RATE, Dnsmos, align, mean_ci, pesq_wb, \
    si_snr, stoi_score
from peers import Method, PeerError, Unavailable, setup_command

GOLDEN_METHODS = ("ml", "ml-model")  # --golden records these methods' per-file scores
GOLDEN_PAIRS = 4  # [1, 1000] --golden records the first this many scored pairs (the golden test re-runs them)
OUT = "eval_out"  # output folder (git-ignored): results.md, scores.csv, charts
SETS = {"dev": "../shared/data/dev", "dev_real": "../shared/data/dev_real"}  # --sets: name -> folder of clean/ noisy/

BEGIN_MARK = "<!-- eval:begin -->"
END_MARK = "<!-- eval:end -->"

# (key, column title, decimals, higher is better)
METRICS = [
    ("pesq", "PESQ-WB", 2, True),
    ("stoi", "STOI", 3, True),
    ("si_snri", "SI-SNRi dB", 2, True),
    ("dnsmos_sig", "DNSMOS SIG", 2, True),
    ("dnsmos_bak", "DNSMOS BAK", 2, True),
    ("dnsmos_ovrl", "DNSMOS OVRL", 2, True),
    ("rtf", "RTF (1 core)", 3, False),
]
REFERENCE_FREE = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "rtf")


class EvalError(Exception):
    """A bad input or setup; main() prints the one-line message and exits non-zero."""


# ----------------------------------------------------------------------------- our methods
# Each setup function loads what the method needs once and returns a Method whose process()
# starts from fresh state on every call (the peers' are in peers.py). Unavailable(note) skips it.

def setup_noisy(args) -> Method:
    return Method("noisy", "noisy input", lambda x: x, latency_ms=None, timed=False)


def _import_pipeline(module):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # any failure to import means the method cannot be scored
        raise Unavailable(f"{module}.py cannot be imported ({type(exc).__name__}: {exc})") from None


def _warm_up(process):
    # Loads models and caches before timing, so RTF measures processing, not start-up.
    process(np.zeros(SAMPLE_RATE, np.float32))


def _pipeline_method(key, label, process, latency_ms):
    try:
        _warm_up(process)
    except Exception as exc:  # a model that will not load or run makes the method unavailable, not the run
        raise Unavailable(f"{label} failed: {exc}") from None
    return Method(key, label, process, float(latency_ms))


def setup_ml(args) -> Method:
    ml = _import_pipeline("ml_denoiser_pipeline")
    return _pipeline_method("ml", "ML pipeline (full chain)",
                            lambda x: ml.denoise_array(x, model_path=args.model), ml.latency_ms())


def setup_ml_model(args) -> Method:
    ml = _import_pipeline("ml_denoiser_pipeline")
    return _pipeline_method("ml-model", "ML model only",
                            lambda x: ml.denoise_array(x, model_path=args.model, model_only=True), ml.latency_ms())


def setup_fast(args) -> Method:
    ml = _import_pipeline("ml_denoiser_pipeline")
    cfg = ml.default_config(low_latency=True)
    return _pipeline_method("fast", "ML pipeline --low-latency (full chain)",
                            lambda x: ml.denoise_array(x, low_latency=True), ml.latency_ms(cfg))


def setup_fast_model(args) -> Method:
    ml = _import_pipeline("ml_denoiser_pipeline")
    cfg = ml.default_config(low_latency=True)
    return _pipeline_method("fast-model", "low-latency model only",
                            lambda x: ml.denoise_array(x, model_only=True, low_latency=True), ml.latency_ms(cfg))


def setup_dsp(args) -> Method:
    dsp_pipe = _import_pipeline("dsp_filter_pipeline")
    return _pipeline_method("dsp", "DSP pipeline", dsp_pipe.denoise_array, dsp_pipe.latency_ms())


def ml_variant_config(name, flags, model=None):
    """--ml-variant "NAME=FLAGS": the ML pipeline with some of its constants changed by its own flags,
    e.g. "--no-eq --output-gain 1.33", to measure what each spec default costs or buys."""
    ml = _import_pipeline("ml_denoiser_pipeline")
    extra = ["--model", model] if model else []  # first: a variant's own --model comes later and wins
    try:
        return ml.build_parser().parse_args(extra + shlex.split(flags))
    except SystemExit:
        raise EvalError(f"--ml-variant {name}: flags {flags!r} are not ml_denoiser_pipeline.py flags") from None


def setup_ml_variant(args, name, flags):
    ml = _import_pipeline("ml_denoiser_pipeline")
    import dsp
    cfg = ml_variant_config(name, flags, args.model)
    return _pipeline_method(name, f"ML pipeline `{flags}`", lambda x: dsp.process_offline(ml.make_chain(cfg), x),
                            ml.latency_ms(cfg))


BUILTIN_METHODS = {  # name -> setup function; the order here is the table's order
    "noisy": setup_noisy,
    "ml": setup_ml,
    "ml-model": setup_ml_model,
    "fast": setup_fast,
    "fast-model": setup_fast_model,
    "dsp": setup_dsp,
    **peers.PEERS,
}


# ----------------------------------------------------------------------------- data

@dataclass
class Pair:
    name: str  # file stem
    noisy: np.ndarray
    clean: Optional[np.ndarray]
    snr_db: Optional[float]


SNR_IN_NAME = re.compile(r"_snr(-?\d+(?:\.\d+)?)$")


def read_manifest(path):
    if path is None or not Path(path).is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and ("name" not in rows[0] or "snr_db" not in rows[0]):
        raise EvalError(f"{path}: a manifest needs the columns name and snr_db")
    out = {}
    for row in rows:
        try:
            out[Path(row["name"]).stem] = float(row["snr_db"])
        except ValueError:
            raise EvalError(f"{path}: snr_db of {row['name']} is not a number") from None
    return out


def audio_files(folder, flag):
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in (".wav", ".flac", ".ogg", ".opus", ".mp3"))
    if not files:
        raise EvalError(f"{flag} {folder}: no audio files (.wav/.flac/.ogg/.opus/.mp3)")
    return files


def load_pairs(noisy_dir, clean_dir=None, limit=0, manifest=None):
    import dsp

    noisy_files = audio_files(noisy_dir, "--noisy")
    clean_by_name = {}
    if clean_dir is not None:
        clean_files = audio_files(clean_dir, "--clean")
        clean_by_name = {p.name: p for p in clean_files}
        noisy_names = {p.name for p in noisy_files}
        only_noisy = sorted(noisy_names - set(clean_by_name))
        only_clean = sorted(set(clean_by_name) - noisy_names)
        if only_noisy or only_clean:
            parts = []
            if only_noisy:
                parts.append(f"{len(only_noisy)} noisy file(s) without a clean twin "
                             f"({', '.join(only_noisy[:3])}{' ...' if len(only_noisy) > 3 else ''})")
            if only_clean:
                parts.append(f"{len(only_clean)} clean file(s) without a noisy twin "
                             f"({', '.join(only_clean[:3])}{' ...' if len(only_clean) > 3 else ''})")
            raise EvalError("--clean and --noisy must hold the same file names: " + "; ".join(parts))
        if manifest is None:
            manifest = Path(clean_dir).resolve().parent / "manifest.csv"
    snr_table = read_manifest(manifest)
    if limit:
        noisy_files = noisy_files[:limit]
    pairs, notes = [], []
    for path in noisy_files:
        try:
            noisy = dsp.read_audio(path)[0]
            clean = dsp.read_audio(clean_by_name[path.name])[0] if clean_dir is not None else None
        except dsp.AudioError as exc:
            raise EvalError(str(exc)) from None
        if clean is not None and len(clean) != len(noisy):
            notes.append(f"{path.name}: clean and noisy lengths differ "
                         f"({len(clean)} vs {len(noisy)} samples); both cut to the shorter")
            n = min(len(clean), len(noisy))
            clean, noisy = clean[:n], noisy[:n]
        match = SNR_IN_NAME.search(path.stem)
        snr = float(match.group(1)) if match else snr_table.get(path.stem)
        pairs.append(Pair(path.stem, noisy, clean, snr))
    return pairs, notes


# ----------------------------------------------------------------------------- evaluation

def one_core():
    """Pin this process to one CPU so RTF is a one-core figure whatever threads a library starts.
    Returns the previous affinity (to restore), or None where pinning is unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    return before


def score_pair(pair, out, dnsmos, max_lag_ms=MAX_LAG_MS):
    """All metrics for one output; returns (row dict, notes, output aligned to the clean one)."""
    row, notes = {}, []
    if pair.clean is not None:
        aligned, lag = align(out, pair.clean, max_lag_ms)
        row["lag_ms"] = lag * 1000.0 / SAMPLE_RATE
        row["pesq"], note = pesq_wb(pair.clean, aligned)
        notes += [note] if note else []
        row["stoi"], note = stoi_score(pair.clean, aligned)
        notes += [note] if note else []
        row["si_snr"] = si_snr(aligned, pair.clean)
        row["si_snri"] = row["si_snr"] - si_snr(pair.noisy, pair.clean)
        scored = aligned
    else:
        scored = np.asarray(out, np.float32)[:len(pair.noisy)]
    row["dnsmos_sig"], row["dnsmos_bak"], row["dnsmos_ovrl"] = (
        dnsmos(scored) if dnsmos is not None else (float("nan"),) * 3)
    return row, notes, scored


def evaluate(pairs, setups, keep_outputs_for=None, progress=True, max_lag_ms=MAX_LAG_MS,
             with_dnsmos=True, dnsmos_level_dbfs=DNSMOS_LEVEL_DBFS):
    """Run every method on every pair. setups: list of (name, callable returning a Method).
    Returns (rows, methods, notes, kept) where kept maps method label -> output for the pair
    named keep_outputs_for (aligned), for the spectrogram panel."""
    from tqdm import tqdm

    notes, dnsmos = [], None
    try:
        dnsmos = Dnsmos(dnsmos_level_dbfs) if with_dnsmos else None
    except Unavailable as exc:
        notes.append(f"DNSMOS not scored: {exc} (pip install -r requirements-eval.txt)")
    rows, methods, kept = [], [], {}
    bar = tqdm(total=len(pairs) * len(setups), unit="file", disable=not progress, file=sys.stderr)
    for name, setup in setups:
        bar.set_description(name)
        try:
            method = setup()
        except Unavailable as exc:
            notes.append(f"{name} skipped: {exc}")
            bar.update(len(pairs))
            continue
        methods.append(method)
        for pair in pairs:
            prepare = getattr(method.process, "prepare", None)
            if prepare is not None:
                prepare()
            start = time.perf_counter()
            try:
                out = method.process(pair.noisy.copy())
            except Exception as exc:  # one broken method must not sink the whole evaluation
                msg = str(exc) if isinstance(exc, (EvalError, PeerError)) else f"{type(exc).__name__}: {exc}"
                notes.append(f"{name} stopped on {pair.name}: {msg}")
                bar.update(len(pairs) - pairs.index(pair))
                break
            seconds = time.perf_counter() - start
            row, pair_notes, scored = score_pair(pair, out, dnsmos, max_lag_ms)
            row.update(file=pair.name, method=method.label, snr_db=pair.snr_db,
                       rtf=seconds / (len(pair.noisy) / SAMPLE_RATE) if method.timed else float("nan"),
                       note="; ".join(pair_notes))
            for note in pair_notes:
                msg = f"{pair.name}: {note}"
                if msg not in notes:
                    notes.append(msg)
            rows.append(row)
            if keep_outputs_for == pair.name:
                kept[method.label] = scored
            bar.update(1)
    bar.close()
    return rows, methods, notes, kept


# ----------------------------------------------------------------------------- reporting

def fmt(mean, half, decimals):
    if not np.isfinite(mean):
        return "-"
    text = f"{mean:.{decimals}f}"
    return text + (f" ± {half:.{decimals}f}" if np.isfinite(half) else "")


def fmt_latency(ms):
    if ms is None:
        return "offline"
    if not np.isfinite(ms):
        return "?"
    return f"{ms:g} ms"


def summary(rows, methods, with_reference):
    """{label: {metric: (mean, half)}} plus latency and median lag."""
    out = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method.label]
        stats_ = {key: mean_ci([r.get(key) for r in mine]) for key, *_ in METRICS}
        lags = [r["lag_ms"] for r in mine if "lag_ms" in r]
        stats_["lag_ms"] = float(np.median(lags)) if lags else float("nan")
        stats_["n"] = len(mine)
        out[method.label] = stats_
    return out


def results_table(rows, methods, with_reference):
    summ = summary(rows, methods, with_reference)
    metrics = [m for m in METRICS if with_reference or m[0] in REFERENCE_FREE]
    head = ["method"] + [title for _, title, _, _ in metrics] + ["latency"]
    if with_reference:
        head.append("lag ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        s = summ[method.label]
        cells = [method.label] + [fmt(*s[key], dec) for key, _, dec, _ in metrics]
        cells.append("-" if not method.timed else fmt_latency(method.latency_ms))
        if with_reference:
            cells.append(f"{s['lag_ms']:.1f}" if np.isfinite(s["lag_ms"]) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def snr_tables(rows, methods):
    snrs = sorted({r["snr_db"] for r in rows if r["snr_db"] is not None})
    if not snrs:
        return "No SNR known for these files (names lack _snrN and no manifest.csv gives snr_db).", []
    parts, csv_rows = [], []
    for key, title, dec, _ in METRICS:
        if key == "rtf":
            continue
        head = ["method"] + [f"{s:g} dB" for s in snrs]
        lines = [f"**{title} by input SNR** (mean)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            cells = [m.label]
            for s in snrs:
                vals = [r.get(key) for r in rows if r["method"] == m.label and r["snr_db"] == s]
                mean, half = mean_ci(vals)
                cells.append(fmt(mean, float("nan"), dec))
                csv_rows.append({"method": m.label, "snr_db": s, "metric": key, "mean": mean,
                                 "ci95": half, "n": len(vals)})
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts), csv_rows


def paired_table(rows, methods, a, b):
    """B - A file by file for each scored metric: the mean difference and its interval, and a verdict that
    counts a difference only where the whole interval lies on one side of zero."""
    labels = {m.name: m.label for m in methods}
    if a not in labels or b not in labels:
        missing = [m for m in (a, b) if m not in labels]
        return f"--compare: {', '.join(missing)} did not run (see the notes)"
    la, lb = labels[a], labels[b]
    by_file = {}
    for r in rows:
        by_file.setdefault(r["file"], {})[r["method"]] = r
    lines = [f"Paired, file by file: {lb} - {la}; mean and {int(CONFIDENCE * 100)}% interval of the difference.",
             "", "| metric | difference | verdict |", "|---|---|---|"]
    for key, title, decimals, higher in METRICS:
        if key == "rtf":
            continue
        diffs = []
        for scores in by_file.values():
            if la in scores and lb in scores:
                x, y = scores[la].get(key), scores[lb].get(key)
                if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):
                    diffs.append(y - x)
        if not diffs:
            continue
        mean, half = mean_ci(diffs)
        if not np.isfinite(half):
            verdict = "too few files"
        elif (mean - half > 0) == higher and abs(mean) > half:
            verdict = f"{lb} better"
        elif abs(mean) > half:
            verdict = f"{lb} worse"
        else:
            verdict = "no difference (inside the interval)"
        lines.append(f"| {title} | {mean:+.{decimals}f} ± {half:.{decimals}f} | {verdict} |")
    return "\n".join(lines)


def write_csv(path, rows, fields):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    os.replace(tmp, path)


def save_figure(fig, path, dpi=100):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_bars(out_dir, rows, methods, with_reference):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summary(rows, methods, with_reference)
    written = []
    for key, title, _, higher in METRICS:
        if not with_reference and key not in REFERENCE_FREE:
            continue
        shown = [m for m in methods if np.isfinite(summ[m.label][key][0])]
        if not shown:
            continue
        means = [summ[m.label][key][0] for m in shown]
        halves = [np.nan_to_num(summ[m.label][key][1]) for m in shown]
        colors = ["tab:orange" if m.name in ("ml", "ml-model", "dsp") else
                  "tab:gray" if m.name == "noisy" else "tab:blue" for m in shown]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 4))
        ax.bar(range(len(shown)), means, yerr=halves, capsize=4, color=colors)
        ax.set_xticks(range(len(shown)), [m.label for m in shown], rotation=30, ha="right")
        ax.set_ylabel(title + ("" if higher else " (lower is better)"))
        ax.set_title(f"{title}: mean and {int(CONFIDENCE * 100)}% interval")
        written.append(save_figure(fig, Path(out_dir) / f"bar_{key}.png"))
    return written


def plot_spectrograms(out_dir, pair, kept):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import stft

    panels = [("noisy input", pair.noisy)] + [(k, v) for k, v in kept.items() if k != "noisy input"]
    if pair.clean is not None:
        panels.append(("clean reference", pair.clean))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.6 * len(panels) + 0.6), sharex=True,
                             squeeze=False)
    for ax, (title, x) in zip(axes[:, 0], panels):
        f, t, z = stft(x, SAMPLE_RATE, nperseg=512, noverlap=384)
        db = 20 * np.log10(np.abs(z) + 1e-6)
        ax.pcolormesh(t, f / 1000, db, vmin=-100, vmax=-20, shading="auto", cmap="magma")
        ax.set_ylabel("kHz")
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("s")
    fig.suptitle(pair.name, fontsize=10)
    return save_figure(fig, Path(out_dir) / f"spectrogram_{pair.name}.png", dpi=72)


def plot_snr(out_dir, csv_rows, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, title, _, _ in METRICS:
        mine = [r for r in csv_rows if r["metric"] == key]
        if not mine or not any(np.isfinite(r["mean"]) for r in mine):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in methods:
            pts = sorted((r["snr_db"], r["mean"]) for r in mine if r["method"] == m.label)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m.label)
        ax.set_xlabel("input SNR (dB)")
        ax.set_ylabel(title)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, Path(out_dir) / f"snr_{key}.png"))
    return written


def write_golden(path, rows, methods, names, model_path, pairs=GOLDEN_PAIRS):
    """Per-file PESQ-WB and SI-SNRi of our pipelines on a few pairs, with the model's hash: the golden
    test (tests/test_ml_denoiser_pipeline.py) recomputes them, so a broken export, STFT or chain change,
    or a model swapped without re-measuring, fails CI."""
    import hashlib
    import json
    labels = {m.label: m.name for m in methods if m.name in GOLDEN_METHODS}
    if not labels:
        raise EvalError(f"--golden needs the methods {', '.join(GOLDEN_METHODS)} in the run")
    keep = names[:pairs]
    files = {}
    for row in rows:
        if row["file"] in keep and row["method"] in labels:
            files.setdefault(row["file"], {})[labels[row["method"]]] = {
                "pesq": round(row["pesq"], 4), "si_snri": round(row["si_snri"], 4)}
    model = Path(model_path)
    golden = {"model": model.name, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
              "files": files}
    Path(path).write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")


def update_readme(path, block):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"--readme {path}: cannot read ({exc.strerror})") from None
    begin, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if begin < 0 or end < begin:
        raise EvalError(f"--readme {path}: no {BEGIN_MARK} ... {END_MARK} markers; "
                        "add them where the results should go")
    new = text[:begin + len(BEGIN_MARK)] + "\n" + block.strip() + "\n" + text[end:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line

def build_parser():
    import dsp
    p = dsp.OneLineParser(description="Score the ML and DSP pipelines and peer denoisers on noisy/clean pairs.")
    p.add_argument("--clean", help="folder of clean references (matched to --noisy by file name)")
    p.add_argument("--noisy", help="folder of noisy inputs")
    p.add_argument("--sets", nargs="*", metavar="SET",
                   help=f"score whole paired sets instead, each a table: {', '.join(SETS)} (all of them if none "
                        "is named) or NAME=FOLDER with clean/ and noisy/ in it")
    p.add_argument("--methods", help="comma-separated subset, e.g. noisy,ml,nsnet2 "
                   f"(available: {','.join(BUILTIN_METHODS)} and --cmd names)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N pairs")
    p.add_argument("--by-snr", action="store_true", help="break results down by input SNR")
    p.add_argument("--manifest", help="CSV with columns name,snr_db (default: manifest.csv "
                   "beside the clean folder)")
    p.add_argument("--cmd", nargs=2, action="append", default=[], metavar=("NAME", "COMMAND"),
                   help='extra method: a command with {in} and {out}, e.g. "tool {in} {out}"')
    p.add_argument("--ml-variant", action="append", default=[], metavar="NAME=FLAGS",
                   help='extra method: the ML pipeline with changed constants, e.g. "ml-noeq=--no-eq"')
    p.add_argument("--model", help="ONNX model for the ML pipeline (default: its own default)")
    p.add_argument("--spectrogram", metavar="NAME",
                   help="file (stem) for the spectrogram panel (default: the first pair)")
    p.add_argument("--compare", metavar="A,B",
                   help="also compare two of the methods file by file: B - A per metric with its 95%% interval "
                        "(paired, so tighter than the tables' intervals), and whether B is better, worse or neither")
    p.add_argument("--readme", help="Markdown file whose eval markers receive the results table")
    p.add_argument("--golden", metavar="JSON", help="also write per-file scores of ml and ml-model on the "
                   f"first {GOLDEN_PAIRS} pairs here (tests/golden_metrics.json for the golden test)")
    p.add_argument("--dnsmos-level", type=float, default=DNSMOS_LEVEL_DBFS, metavar="DBFS",
                   help="score DNSMOS with every output scaled to this RMS level, e.g. -26 (default: as produced)")
    import metrics
    dsp.add_constant_flags(p, globals(), ["OUT", "GOLDEN_PAIRS"], __file__)
    dsp.add_constant_flags(p, vars(metrics), ["MAX_LAG_MS"], metrics.__file__)
    p.add_argument("--no-dnsmos", action="store_true",
                   help="skip DNSMOS (its slowest metric) for quick runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def choose_setups(args):
    available = dict((name, (lambda s=setup: s(args))) for name, setup in BUILTIN_METHODS.items())
    for name, template in args.cmd:
        if name in available:
            raise EvalError(f"--cmd {name}: the name is already taken; choose another")
        if "{in}" not in template or "{out}" not in template:
            raise EvalError(f"--cmd {name}: the command must contain {{in}} and {{out}}")
        available[name] = lambda n=name, t=template: setup_command(n, t)
    for spec in args.ml_variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise EvalError(f"--ml-variant {spec!r}: expected NAME=FLAGS, e.g. ml-noeq=--no-eq")
        if name in available:
            raise EvalError(f"--ml-variant {name}: the name is already taken; choose another")
        ml_variant_config(name, flags, args.model)  # bad flags fail now, not after an hour of scoring
        available[name] = lambda n=name, f=flags: setup_ml_variant(args, n, f)
    chosen = list(available.items())
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise EvalError(f"--methods: unknown {', '.join(unknown)} "
                            f"(available: {', '.join(available)})")
        chosen = [(m, available[m]) for m in wanted]
    if args.compare is not None:
        pair = [m.strip() for m in args.compare.split(",")]
        names = [name for name, _ in chosen]
        if len(pair) != 2 or pair[0] == pair[1] or not all(m in names for m in pair):
            raise EvalError(f"--compare {args.compare!r}: expected A,B, two different methods of this run "
                            f"({', '.join(names)})")
        args.compare = tuple(pair)
    return chosen


def resolve_sets(args):
    """[(set name or None, noisy folder, clean folder or None, manifest)] from --sets or --noisy/--clean."""
    if args.sets is None:
        if not args.noisy:
            raise EvalError("give --noisy (and --clean), or --sets")
        return [(None, args.noisy, args.clean, args.manifest)]
    if args.noisy or args.clean or args.manifest:
        raise EvalError("--sets takes the place of --noisy/--clean/--manifest; give one or the other")
    out = []
    for spec in args.sets or list(SETS):
        name, sep, folder = spec.partition("=")
        folder = folder if sep else SETS.get(name)
        if not name or folder is None:
            raise EvalError(f"--sets {spec!r}: a known set ({', '.join(SETS)}) or NAME=FOLDER")
        root = Path(folder)
        if not (root / "clean").is_dir() or not (root / "noisy").is_dir():
            raise EvalError(f"--sets {name}: {root} needs clean/ and noisy/ folders")
        out.append((name, root / "noisy", root / "clean", None))
    return out


def report_set(args, name, pairs, rows, methods, with_ref, out_dir):
    """One set's Markdown (table, by-SNR breakdown), its CSV and charts under out_dir."""
    intro = (f"{len(pairs)} {'pairs' if with_ref else 'files'}; mean ± {int(CONFIDENCE * 100)}% "
             f"interval. RTF = processing time / audio duration on one CPU core. Lag = median "
             f"delay found by cross-correlation with the clean reference (outputs are aligned "
             f"before scoring).")
    if args.dnsmos_level is not None:
        intro += f" DNSMOS scored with every output at {args.dnsmos_level:g} dBFS RMS (--dnsmos-level)."
    table = results_table(rows, methods, with_ref)
    md = ([f"## {name}", ""] if name else []) + [intro, "", table]
    if args.by_snr:
        text, snr_rows = snr_tables(rows, methods)
        md += ["", f"### {name + ': b' if name else 'B'}y input SNR", "", text]
        if snr_rows:
            write_csv(out_dir / "by_snr.csv", snr_rows, ["method", "snr_db", "metric", "mean", "ci95", "n"])
            plot_snr(out_dir, snr_rows, methods)
    comparison = paired_table(rows, methods, *args.compare) if args.compare is not None and with_ref else None
    if comparison:
        md += ["", f"### {name + ': c' if name else 'C'}omparison", "", comparison]
    fields = ["file", "method", "snr_db", "pesq", "stoi", "si_snr", "si_snri", "dnsmos_sig",
              "dnsmos_bak", "dnsmos_ovrl", "rtf", "lag_ms", "note"]
    write_csv(out_dir / "scores.csv", rows, fields)
    plot_bars(out_dir, rows, methods, with_ref)
    return "\n".join(md), intro, table, comparison


def run(args):
    if args.limit < 0:
        raise EvalError("--limit must be 0 (all) or a positive count")
    if args.max_lag_ms <= 0:
        raise EvalError("--max-lag-ms must be positive")
    if args.dnsmos_level is not None and not -80 <= args.dnsmos_level <= 0:
        raise EvalError("--dnsmos-level must be a level in dBFS between -80 and 0, e.g. -26")
    setups = choose_setups(args)
    sets = [(name, *load_pairs(noisy, clean, args.limit, manifest), clean is not None)
            for name, noisy, clean, manifest in resolve_sets(args)]
    first = sets[0][1]
    chosen = args.spectrogram or first[0].name
    if chosen not in [p.name for p in first]:
        raise EvalError(f"--spectrogram {chosen}: no such pair among the scored files of the first set")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python evaluate.py " + " ".join(shlex.quote(a) for a in args.argv)
    report, readme, printed, notes = [f"# Evaluation\n\n`{command}`\n"], [], [], []
    all_rows = []
    for index, (name, pairs, load_notes, with_ref) in enumerate(sets):
        affinity = one_core()
        try:
            rows, methods, run_notes, kept = evaluate(pairs, setups, keep_outputs_for=chosen if index == 0 else None,
                                                      progress=not args.quiet, max_lag_ms=args.max_lag_ms,
                                                      with_dnsmos=not args.no_dnsmos,
                                                      dnsmos_level_dbfs=args.dnsmos_level)
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
        prefix = f"{name}: " if name else ""
        notes += [prefix + n for n in load_notes + run_notes]
        if not methods:
            raise EvalError("no method could run: " + "; ".join(notes))
        set_dir = out_dir / name if name else out_dir
        set_dir.mkdir(parents=True, exist_ok=True)
        md, intro, table, comparison = report_set(args, name, pairs, rows, methods, with_ref, set_dir)
        report += ["", md]
        readme += ([f"**{name}**: {intro}"] if name else [f"Generated by `{command}`: {intro}"]) + ["", table]
        readme += [""]
        printed += ([f"{name}:"] if name else []) + [table, ""]
        if comparison:
            printed += [comparison, ""]
        if index == 0:
            plot_spectrograms(out_dir, pairs[[p.name for p in pairs].index(chosen)], kept)
            if args.golden:
                import ml_denoiser_pipeline
                write_golden(args.golden, rows, methods, [p.name for p in pairs],
                             args.model or ml_denoiser_pipeline.MODEL, pairs=args.golden_pairs)
        all_rows += [dict(r, set=name) for r in rows]
    if notes:
        report += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    (out_dir / "results.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    if args.readme:
        head = [f"Generated by `{command}`.", ""] if sets[0][0] else []
        update_readme(args.readme, "\n".join(head + readme))
    print("\n".join(printed).rstrip())
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"wrote {out_dir}/results.md, scores.csv and PNG charts")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
