"""Signal processing shared by ml_denoiser_pipeline.py and dsp_filter_pipeline.py (numpy/scipy only).

Nothing here is a tunable: the constants that shape the sound live at the top of each pipeline script and
are passed in. What lives here is the machinery both chains share:
  Framer       any host block size in, the same size out, a fixed delay, so live audio and file mode run the
               very same code whatever block sizes the sound card or the file reader hand over
  WindowSTFT   the numpy twin of torch.stft/istft(center=True) that model.py trains with
  BandBoost    stateful Butterworth band-pass boost (the post-EQ)
  HighPass     stateful Butterworth high-pass
  Gate         soft noise gate with hold and release
  soft_limit   a knee that never lets a sample past full scale
  read_audio / write_audio / sanitize   file I/O with one-line errors, NaN/Inf scrubbing
"""
import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # Hz; both chains run at 16 kHz mono


class AudioError(Exception):
    """A problem with an audio file or model, reported to the user as one line."""


# ---------------------------------------------------------------------------------------------------------
# Streaming framing
# ---------------------------------------------------------------------------------------------------------

class Framer:
    """Runs fn on fixed frames of `frame` samples while taking and returning blocks of any length.

    Double-buffered: while frame k fills, the output of frame k-1 is played out sample for sample, so
    output sample n is always fn's sample from exactly `frame` samples earlier (plus fn's own delay).
    That is why streaming equals one-shot processing for every block size, and why nothing queues up."""

    def __init__(self, frame, fn):
        self.frame, self.fn = frame, fn
        self.inbuf = np.zeros(frame, np.float32)
        self.outbuf = np.zeros(frame, np.float32)
        self.pos = 0

    def process(self, x):
        y = np.empty(len(x), np.float32)
        i = 0
        while i < len(x):
            n = min(self.frame - self.pos, len(x) - i)
            self.inbuf[self.pos:self.pos + n] = x[i:i + n]
            y[i:i + n] = self.outbuf[self.pos:self.pos + n]
            self.pos += n
            i += n
            if self.pos == self.frame:
                self.outbuf[:] = self.fn(self.inbuf)
                self.pos = 0
        return y


def crossfade_window(length, power=1.0):
    """Synthesis window for overlap-adding 50%-overlapped windows: h^p / (h^p + (1 - h)^p) of the periodic
    Hann h. Any p keeps the constant overlap-add (two windows half a window apart see h and 1 - h, and the
    two weights sum to exactly 1) and the zero at the window's ends, so there are no seams; p = 1 is the Hann
    itself, p < 1 flattens it towards an even average of the two windows' estimates of each sample."""
    h = np.hanning(length + 1)[:-1].astype(np.float64)
    hp, rest = h ** power, (1.0 - h) ** power
    return (hp / (hp + rest)).astype(np.float32)


class WindowSTFT:
    """STFT of one fixed-length window, identical to model.py's torch.stft(center=True, reflect padding,
    periodic Hann) so the ONNX model sees in the pipeline exactly the features it was trained on."""

    def __init__(self, length, n_fft, hop):
        self.length, self.n_fft, self.hop = length, n_fft, hop
        pad = n_fft // 2
        self.frames = 1 + length // hop
        self.window = scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)
        self.index = np.arange(self.frames)[:, None] * hop + np.arange(n_fft)[None, :]
        env = np.zeros(length + 2 * pad, np.float64)
        np.add.at(env, self.index, np.broadcast_to(self.window.astype(np.float64) ** 2, self.index.shape))
        # torch.istft divides by the summed squared window; at the reflect-padded edges fewer frames
        # overlap, so this envelope is not constant there (it never reaches zero: the NOLA condition).
        self.inv_env = (1.0 / env[pad:pad + length]).astype(np.float32)

    def forward(self, x):
        """[length] -> complex [F, frames]"""
        padded = np.pad(x, self.n_fft // 2, mode="reflect")
        return np.fft.rfft(padded[self.index] * self.window, axis=1).T

    def inverse(self, spec):
        frames = np.fft.irfft(spec.T, n=self.n_fft, axis=1).astype(np.float32) * self.window
        out = np.zeros(self.length + self.n_fft, np.float32)
        np.add.at(out, self.index, frames)
        pad = self.n_fft // 2
        return out[pad:pad + self.length] * self.inv_env


# ---------------------------------------------------------------------------------------------------------
# Filters and dynamics; every one carries its state from one call to the next so block edges never click
# ---------------------------------------------------------------------------------------------------------

class BandBoost:
    """Adds (gain - 1) x a 4th-order Butterworth band-pass to the signal: +gain_db inside the band, 0 dB
    far outside. In the band the band-pass is nearly in phase with the input, so the sum is a clean boost."""

    def __init__(self, gain_db, low_hz, high_hz, rate=SAMPLE_RATE):
        self.extra = 10 ** (gain_db / 20) - 1
        self.sos = scipy.signal.butter(2, [low_hz, high_hz], btype="bandpass", fs=rate, output="sos")
        self.zi = np.zeros((self.sos.shape[0], 2))

    def process(self, x):
        band, self.zi = scipy.signal.sosfilt(self.sos, x, zi=self.zi)
        return (x + self.extra * band).astype(np.float32)


class HighPass:
    """Butterworth high-pass (rumble, desk thumps, mains hum below the cutoff)."""

    def __init__(self, cutoff_hz, order=4, rate=SAMPLE_RATE):
        self.sos = scipy.signal.butter(order, cutoff_hz, btype="highpass", fs=rate, output="sos")
        self.zi = np.zeros((self.sos.shape[0], 2))

    def process(self, x):
        y, self.zi = scipy.signal.sosfilt(self.sos, x, zi=self.zi)
        return y.astype(np.float32)


class Gate:
    """Soft noise gate run once per frame.

    Openness goes from 0 (closed, -depth_db) at RMS `floor` to 1 (open, 0 dB) at RMS `ceil`, smoothly in
    between (a smoothstep on the log level). Opening is immediate (ramped over attack_samp so it does not
    click); after the level drops the gate holds for `hold_frames` frames, because the quiet consonants and
    short pauses inside a sentence are exactly what a gate must not chop, then fades out over release_frames."""

    def __init__(self, floor, ceil, hold_frames, release_frames, depth_db, attack_samp, frame):
        self.log_floor, self.log_ceil = np.log(floor), np.log(ceil)
        self.hold_frames, self.depth_db = hold_frames, depth_db
        self.release_step = 1.0 / max(release_frames, 1e-9)
        self.ramp_attack = np.minimum(np.arange(1, frame + 1) / max(attack_samp, 1), 1.0).astype(np.float32)
        self.ramp_release = (np.arange(1, frame + 1) / frame).astype(np.float32)
        self.openness, self.hold = 0.0, 0
        self.gain = self._gain(0.0)

    def _gain(self, openness):
        return 10 ** (-self.depth_db * (1 - openness) / 20)

    def process(self, x, level=None):
        """Gate one frame; `level` (RMS) defaults to the frame's own."""
        if level is None:
            level = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
        t = np.clip((np.log(level + 1e-12) - self.log_floor) / (self.log_ceil - self.log_floor), 0.0, 1.0)
        target = t * t * (3 - 2 * t)
        if target >= self.openness:
            self.openness, self.hold = target, self.hold_frames
            ramp = self.ramp_attack
        elif self.hold > 0:
            self.hold -= 1
            ramp = self.ramp_release
        else:
            self.openness = max(target, self.openness - self.release_step)
            ramp = self.ramp_release
        new_gain = self._gain(self.openness)
        gains = self.gain + (new_gain - self.gain) * ramp[: len(x)]
        self.gain = new_gain
        return (x * gains).astype(np.float32)


def soft_limit(x, knee=0.9, ceiling=0.995):
    """Identity below `knee`, then a tanh curve that approaches `ceiling` (just under full scale, so a
    16-bit writer never clips either): loud peaks are rounded off instead of wrapping or clipping hard."""
    mag = np.abs(x)
    over = mag > knee
    if not over.any():
        return x
    y = x.copy()
    room = ceiling - knee
    y[over] = np.sign(x[over]) * (knee + room * np.tanh((mag[over] - knee) / room))
    return y


def sanitize(x, warn_state):
    """Replace NaN/Inf by 0; warn once per warn_state dict (a broken driver or file must not kill the call)."""
    bad = ~np.isfinite(x)
    if bad.any():
        if not warn_state.get("warned"):
            print(f"warning: {int(bad.sum())} NaN/Inf input samples replaced by 0 (further ones silently)",
                  file=sys.stderr)
            warn_state["warned"] = True
        x = np.where(bad, 0.0, x).astype(np.float32)
    return x


# ---------------------------------------------------------------------------------------------------------
# Audio files
# ---------------------------------------------------------------------------------------------------------

def read_audio(path):
    """Any file soundfile reads -> (float32 mono at 16 kHz, original rate, channels, frames)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"input not found: {path}")
    if path.is_dir():
        raise AudioError(f"input is a folder, not an audio file: {path}")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot read {path}: not a supported or intact audio file ({str(e).strip()})")
    if audio.shape[0] == 0:
        raise AudioError(f"input is empty (no samples): {path}")
    channels = audio.shape[1]
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return mono.astype(np.float32), rate, channels, audio.shape[0]


def write_audio(path, audio, rate):
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a file
    under the final name. The format follows the extension (WAV, FLAC, OGG...)."""
    path = Path(path)
    fmt = sf.available_formats()
    ext = path.suffix.lstrip(".").upper()
    if ext not in fmt and not (ext == "OPUS" and "OGG" in fmt):
        raise AudioError(f"cannot write {path}: unknown output format '{path.suffix}' (try .wav or .flac)")
    if not path.parent.exists():
        raise AudioError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        kind = "OGG" if ext == "OPUS" else ext
        subtype = "OPUS" if ext == "OPUS" else None
        sf.write(tmp, audio, rate, format=kind, subtype=subtype)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl+C too: the half-written temporary goes, the user's files stay as they were
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (sf.LibsndfileError, RuntimeError, ValueError, OSError)):
            raise AudioError(f"cannot write {path}: {e}") from None
        raise


def from_16k(audio, rate, frames):
    """Back to the input's rate, trimmed or padded to exactly its frame count (soxr rounds lengths)."""
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, rate, quality="HQ").astype(np.float32)
    out = np.zeros(frames, np.float32)
    out[: min(frames, len(audio))] = audio[:frames]
    return out


# ---------------------------------------------------------------------------------------------------------
# File mode and benchmark, shared by both pipelines: the chain object is the one live audio uses
# ---------------------------------------------------------------------------------------------------------

FILE_BLOCK_SAMP = 4096  # block size file mode feeds the chain; any value gives the same output


def process_offline(chain, audio, block=FILE_BLOCK_SAMP):
    """Stream audio through a fresh chain exactly as live audio would, then remove its fixed delay so
    output sample n belongs to input sample n (the tail is flushed with zeros)."""
    delay = chain.latency_samples
    padded = np.concatenate([audio.astype(np.float32), np.zeros(delay, np.float32)])
    out = np.concatenate([chain.process(padded[i:i + block]) for i in range(0, len(padded), block)])
    return out[delay:delay + len(audio)]


def denoise_file(make_chain, src, dst, keep_16k=False):
    audio, rate, _, frames = read_audio(src)
    out = process_offline(make_chain(), audio)
    if keep_16k:
        write_audio(dst, out, SAMPLE_RATE)
    else:
        write_audio(dst, from_16k(out, rate, frames), rate)


def run_file_mode(make_chain, src, dst, keep_16k=False):
    """--input FILE --output FILE, or --input DIR --output DIR (every audio file in DIR). Returns an exit
    code; a folder run carries on past a bad file and reports it."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        if dst.is_dir():
            dst = dst / src.name
        if dst.resolve() == src.resolve():
            raise AudioError(f"--output is the input file {src}: it would be overwritten; write somewhere else")
        denoise_file(make_chain, src, dst, keep_16k)
        print(f"wrote {dst}")
        return 0
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise AudioError(f"--output {dst} is inside the input folder {src}: outputs would overwrite inputs "
                         "or be read as inputs; pick a folder outside it")
    exts = {f".{e.lower()}" for e in sf.available_formats()} | {".opus", ".oga"}
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise AudioError(f"no audio files in folder {src}")
    if dst.exists() and not dst.is_dir():
        raise AudioError(f"--input is a folder, so --output must be a folder too: {dst}")
    dst.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    failed = []
    for p in tqdm(files, desc="denoising", unit="file"):
        try:
            denoise_file(make_chain, p, dst / p.name, keep_16k)
        except AudioError as e:
            failed.append(p.name)
            tqdm.write(f"error: {e}", file=sys.stderr)
    print(f"wrote {len(files) - len(failed)} of {len(files)} files to {dst}")
    if failed:
        print(f"error: {len(failed)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def bench(chain, frame, seconds=20.0, label="hop"):
    """Time the chain one frame at a time on noise-like input (no sound card involved)."""
    import time
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 0.03).astype(np.float32)
    for i in range(0, 10 * frame, frame):  # warm-up: first ONNX runs allocate
        chain.process(audio[i:i + frame])
    times = []
    for i in range(0, len(audio) - frame + 1, frame):
        t = time.perf_counter()
        chain.process(audio[i:i + frame])
        times.append(time.perf_counter() - t)
    times = np.array(times) * 1000
    budget = frame / SAMPLE_RATE * 1000
    print(f"{label}: {frame} samples = {budget:g} ms of audio, {len(times)} timed")
    print(f"processing time per {label}: median {np.median(times):.3f} ms, p99 {np.percentile(times, 99):.3f} ms")
    print(f"real-time factor: {np.median(times) / budget:.4f} (median; below 1 keeps up)")
    print(f"algorithmic latency: {chain.latency_samples / SAMPLE_RATE * 1000:g} ms ({chain.latency_samples} samples)")
    return times


def build_parser(description, namespace, source_file):
    """The command line both pipelines share: file mode, --bench, live-device flags, and one flag per
    UPPER_CASE constant of the calling script (MIC and CABLE go to live_audio's --mic/--cable)."""
    import live_audio
    ap = OneLineParser(description=description, allow_abbrev=False)
    ap.add_argument("--input", help="file mode: noisy audio file or folder")
    ap.add_argument("--output", help="file mode: where to write the result (file or folder)")
    ap.add_argument("--keep-16k", action="store_true", help="file mode: write 16 kHz instead of the input's rate")
    ap.add_argument("--bench", action="store_true", help="print processing time, real-time factor and latency")
    names = [n for n in namespace if n.isupper() and n not in ("MIC", "CABLE")]
    add_constant_flags(ap, namespace, names, source_file)
    live_audio.add_arguments(ap, mic_default=namespace.get("MIC"), cable_default=namespace.get("CABLE"))
    return ap


def with_overrides(cfg, overrides, parser=None):
    """cfg with some settings replaced (keyword names = flag names with underscores), each held to the range
    its constant documents, as the flag would be."""
    ranges = getattr(parser, "constant_ranges", {})
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise AudioError(f"unknown setting {k}")
        if k in ranges and not ranges[k][0] <= v <= ranges[k][1]:
            raise AudioError(f"{k.upper()} must be in {ranges[k][0]:g}..{ranges[k][1]:g}, not {v}")
        setattr(cfg, k, v)
    return cfg


def run(args, make_chain, label):
    """Dispatch to --bench, file mode or live audio; every expected failure becomes one line and exit 2."""
    try:
        if getattr(args, "list", False):  # listing devices needs no chain: do not load the model for it
            import live_audio
            return live_audio.run_live(None, args)
        if args.bench:
            chain = make_chain()
            bench(chain, chain.frame_samp, label=label)
            return 0
        if args.input or args.output:
            if not (args.input and args.output):
                raise AudioError("file mode needs both --input and --output")
            return run_file_mode(make_chain, args.input, args.output, args.keep_16k)
        import live_audio
        return live_audio.run_live(make_chain(), args)
    except AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class SettingError(SystemExit):
    """Exit status 2 for a bad flag; str() is the one-line message already printed."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (a pipeline's usage line lists dozens of flags), exit status 2."""

    def error(self, message):
        line = f"error: {message} (--help lists every setting)"
        print(line, file=sys.stderr)
        raise SettingError(line)


RANGE_IN_COMMENT = re.compile(r"^\[(-?[0-9.e+-]+), (-?[0-9.e+-]+)\]\s*")


def ranged(kind, low, high):
    """An argparse type: a number of `kind` in low..high, or a one-line reason."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {'a whole number' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low:g}..{high:g}, not {text}")
        return value
    return parse


def add_constant_flags(parser, namespace, names, source_file):
    """One flag per UPPER_CASE constant (SPECTRAL_FLOOR -> --spectral-floor), defaulting to the constant
    and documented by the constant's own trailing comment, continuation lines included, so the two can never
    drift apart. A comment that opens with [low, high] is the range the flag accepts (parser.constant_ranges)."""
    comments, last = {}, None
    for line in Path(source_file).read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s*(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2)
        elif last and re.match(r"^\s{10,}#\s", line):  # an indented comment continues the one above
            comments[last] += " " + line.strip()[1:].strip()
        else:
            last = None
    parser.constant_ranges = getattr(parser, "constant_ranges", {})
    for name in names:
        value = namespace[name]
        flag = "--" + name.lower().replace("_", "-")
        text = comments.get(name, "")
        kw = {"default": value, "help": text.replace("%", "%%")}
        m = RANGE_IN_COMMENT.match(text)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(value, tuple):  # a LOW HIGH pair; the range holds for each
            kind = int if all(isinstance(v, int) for v in value) else float
            low, high = (float(m.group(1)), float(m.group(2))) if m else (-math.inf, math.inf)
            parser.add_argument(flag, type=ranged(kind, low, high), nargs=len(value), metavar=("LOW", "HIGH"), **kw)
        elif m and isinstance(value, (int, float)):
            low, high = float(m.group(1)), float(m.group(2))
            parser.constant_ranges[name.lower()] = (low, high)
            parser.add_argument(flag, type=ranged(type(value), low, high), metavar=name, **kw)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, metavar=name, **kw)
