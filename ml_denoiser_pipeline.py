"""Real-time ML noise suppression: microphone -> U-Net spectral mask -> virtual cable (the app's microphone).

    python ml_denoiser_pipeline.py                               # live: default mic -> virtual cable
    python ml_denoiser_pipeline.py --mic "USB" --cable "CABLE Input"
    python ml_denoiser_pipeline.py --input noisy.wav --output clean.wav   # file mode, same code path
    python ml_denoiser_pipeline.py --input in_dir/ --output out_dir/     # every audio file in a folder
    python ml_denoiser_pipeline.py --bench                       # time per hop, real-time factor, latency
    python ml_denoiser_pipeline.py --low-latency                 # the 32 ms streaming model (StreamChain below)

Edit the constants below (or pass the matching flag, e.g. --spectral-floor 0.18) to change how it sounds.
One hop of audio, top to bottom (MLChain.hop):
  100 ms of microphone samples x INPUT_GAIN slide into a 200 ms window
  -> 512-point Hann STFT, 128-sample hop, center=True: 1 + 3200 / 128 = 26 frames of 257 bins
  -> denoiser.onnx maps log|STFT| [1, 1, 257, T] to a mask in [0, 1], raised to MASK_POWER and floored at
     SPECTRAL_FLOOR; a model trained with train.py --floor-hops K (the shipped one: K = 20, 2 s) also takes,
     as a second channel, the noise floor: per bin, the minimum over the last K hops of each hop's mean
     log|STFT| (as model.noise_floor computes it), which tells the model what the room sounds like between
     words
  -> mask x noisy magnitude, noisy phase, inverse STFT, then PHASE_ITERS Griffin-Lim rounds from that phase;
     the 200 ms window is weighted by a crossfade built on the periodic Hann (CROSSFADE_POWER) and
     overlap-added with the previous one (every sample's two weights sum to exactly 1: no seams, no ripple)
  -> pause cut (PAUSE_DEPTH_DB, off at 0): a hop in which the mask passes under PAUSE_BELOW_DB of the noisy
     energy is residue between words and is turned down, fading in over PAUSE_RELEASE hops after speech
  -> post-EQ (+5 dB 100 Hz..1 kHz, off by default: see EQ) -> soft gate -> OUTPUT_GAIN -> soft limiter
  -> the cable.
Algorithmic latency is the model's window (its metadata's window_samp, 200 ms): a window is only complete when
its last sample has arrived, and its first half is finished only once the next window has been added. The noise
floor is past audio, so it costs compute, never latency. Real-time budget: every hop must be processed in well
under a hop (half the window, 100 ms); `--bench` prints how far under it is.

With --low-latency (or any model whose metadata says kind=stream) one hop is 16 ms instead (StreamChain.hop):
  16 ms of microphone samples x INPUT_GAIN slide into a 32 ms frame
  -> sqrt-Hann window, 512-point FFT: one frame of 257 bins
  -> denoiser_lowlatency.onnx maps log|X| [1, 257] and its state [1, S] (running mean and GRU memories, handed
     back each hop) to a mask in [0, 1] and the next state; MASK_POWER and SPECTRAL_FLOOR as above (a model
     with metadata mask=complex gives a complex gain [1, 2, 257]: they shape its length, its phase turn stays)
  -> mask x noisy spectrum, inverse FFT, sqrt-Hann again, overlap-added with the previous frame's second half
     (the two windows multiply to a Hann, whose 50 % overlap-add is exactly one)
  -> post-EQ -> soft gate -> OUTPUT_GAIN -> soft limiter -> the cable.
Its latency is the 32 ms frame. The model looks at no audio after the frame, so Griffin-Lim (which needs the
window's later frames) and the pause cut (keyed on a 200 ms window's mask) are the U-Net chain's alone.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.signal

import dsp

# ---- tunables: edit here or pass --flag-name VALUE; [low, high] is the range each may take -------------------
MODEL = str(Path(__file__).resolve().parent / "denoiser.onnx")  # the ONNX mask model; --model PATH for another
LOW_LATENCY = False        # --low-latency: run MODEL_LOW_LATENCY (32 ms) instead of MODEL (200 ms, cleaner)
MODEL_LOW_LATENCY = str(Path(__file__).resolve().parent / "denoiser_lowlatency.onnx")  # the streaming model
LOW_LATENCY_OUT_TARGET_MS = 20  # [0, 5000] live output cushion with --low-latency (--out-target-ms wins), ms: its
                           # hops cost 0.2 ms, so it covers only the devices' jitter; raise if it crackles
LOW_LATENCY_BLOCK_MS = 5   # [1, 200] live device block with --low-latency (--block-ms wins), ms: each ms is delay
CROSSFADE_POWER = 0.3      # [0.05, 10] crossfade between windows: 1 = Hann, lower = a more even average of the two
                           # windows' estimates (smoother), higher = each window's centre counts more
SPECTRAL_FLOOR = 0.03      # [0, 1] lowest mask value: 0 = the model's own, 0.18 gentle; raise if the voice sounds thin
MASK_POWER = 0.9           # [0.1, 4] mask ** this, before the floor: 1 = the model's; up = less noise, thinner speech
PHASE_ITERS = 2            # [0, 16] Griffin-Lim rounds from the noisy phase (0 = noisy phase, as the model trains);
                           # each costs an STFT pair; more than 2 smears transients
PAUSE_DEPTH_DB = 10.0      # [0, 60] extra cut of a hop the mask calls noise only (0 = off); up = quieter pauses,
                           # down if soft words fade
PAUSE_BELOW_DB = -22.0     # [-60, 0] a hop whose mask passes at most this share of the noisy energy gets the full cut
PAUSE_ABOVE_DB = -12.0     # [-60, 0] at or above this share the hop is speech and left alone; a smooth step between
PAUSE_RELEASE = 5          # [1, 100] hops (100 ms each) the cut takes to close after speech; 1 = at once, up = gentler
EQ = False                 # post-EQ (--eq): a presence boost; it colours the voice and lifts residual noise with it
EQ_GAIN_DB = 5.0           # [0, 12] boost between EQ_LOW_HZ and EQ_HIGH_HZ; lower if the voice booms
EQ_LOW_HZ = 100.0          # [20, 7900] lower edge of the boost band
EQ_HIGH_HZ = 1000.0        # [20, 7900] upper edge of the boost band
GATE = True                # soft noise gate on (--no-gate to bypass)
GATE_FLOOR = 0.0003        # [0, 1] RMS at which the gate is fully closed (-70 dBFS); raise if residual hiss leaks
GATE_CEIL = 0.004          # [0, 1] RMS at which the gate is fully open (-48 dBFS); lower if soft speech is dimmed
GATE_HOLD = 8              # [0, 100] hops (100 ms each) the gate stays open after the level drops; keeps consonants
GATE_RELEASE = 3           # [1, 100] hops (100 ms) to fade from open to closed after the hold; 1 abrupt .. 10 slow
GATE_DEPTH_DB = 60.0       # [0, 120] attenuation of a fully closed gate; 30 subtle .. 80 near-silent
GATE_ATTACK_SAMP = 80      # [1, 1600] opening ramp (5 ms): fast enough for plosives, slow enough not to click
INPUT_GAIN = 0.75          # [0.01, 10] applied before the model; leaves headroom for hot microphones
OUTPUT_GAIN = 1.3333       # [0.01, 10] after the gate; x INPUT_GAIN = unity; raise for a quiet mic, mind the limiter
LIMIT_KNEE = 0.9           # [0.1, 1] soft limiter starts rounding peaks here (full scale = 1.0)
STARTUP_BUFFER_MS = 300    # [0, 10000] live mode: audio at start during which over/underruns are expected, not counted
ORT_THREADS = 1            # [1, 64] onnxruntime threads; 1 leaves the other cores to the call app
MIC = None                 # input device: index or name substring; None = the system's default input
CABLE = None               # output device: index or name substring; None = first virtual cable found
# ------------------------------------------------------------------------------------------------------------
NOT_FLAGS = {"NOT_FLAGS", "GEOMETRY_DEFAULT", "LOG_EPS_DEFAULT", "SILENT_LOG_DEFAULT", "GATE_HOP_SAMP"}
GATE_HOP_SAMP = 1600       # GATE_HOLD and GATE_RELEASE count hops of this many samples (100 ms), whatever the chain
# The model's geometry comes from its ONNX metadata (export_model.py writes it); these stand in where a file lacks it.
GEOMETRY_DEFAULT = {"n_fft": 512, "stft_hop_samp": 128, "window_samp": 3200}  # 32 ms STFT, 8 ms hop, 200 ms window
LOG_EPS_DEFAULT = 1e-6     # log(|X| + eps) as model.py trains; the model's metadata overrides it
SILENT_LOG_DEFAULT = -12.0  # model.SILENT_LOG: a hop below it is digital silence; the model's metadata overrides it


def meta_int(meta, key, path, low=0):
    """An integer metadata field (absent = 0), refused with a clear error when malformed or below low."""
    try:
        value = int(float(meta.get(key, 0)))
    except ValueError:
        value = low - 1
    if value < low:
        raise dsp.AudioError(f"model {Path(path).name} has a bad {key} in its metadata: {meta[key]!r}")
    return value


def load_model(path, cfg):
    """(onnxruntime session, metadata, geometry {n_fft, stft_hop_samp, window_samp}, floor_hops) for the mask model,
    refusing one that was trained at another rate or that this chain cannot feed."""
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise dsp.AudioError(f"model not found: {path}. Train one with `python train.py` then "
                             f"`python export_model.py`, or point --model at a denoiser .onnx file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.ort_threads
    opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
        raise dsp.AudioError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "sample_rate" in meta and meta_int(meta, "sample_rate", path) != dsp.SAMPLE_RATE:
        raise dsp.AudioError(f"model {path.name} was trained with sample_rate={meta['sample_rate']} but the "
                             f"pipelines run at {dsp.SAMPLE_RATE} Hz; use a {dsp.SAMPLE_RATE // 1000} kHz model")
    geometry = {k: meta_int(meta, k, path, low=1) if k in meta else v for k, v in GEOMETRY_DEFAULT.items()}
    kind = meta.get("kind", "unet")
    if kind == "stream":
        check_stream_model(session, meta, geometry, path)
        return session, meta, geometry, 0
    if kind != "unet":
        raise dsp.AudioError(f"model {path.name} is of kind {kind!r}; this pipeline runs 'unet' and 'stream' models")
    if geometry["window_samp"] % 2 or geometry["window_samp"] < 2 * geometry["stft_hop_samp"]:
        raise dsp.AudioError(f"model {path.name} has window_samp {geometry['window_samp']}: it must be even (the "
                             "50 % overlap-add) and at least two STFT hops")
    if meta_int(meta, "context_samp", path):
        raise dsp.AudioError(f"model {path.name} wants {meta['context_samp']} samples of context (context_samp), "
                             "which this pipeline does not feed; export a model trained without it")
    floor_hops = meta_int(meta, "floor_hops", path)
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    bins, channels = geometry["n_fft"] // 2 + 1, 2 if floor_hops else 1
    if (shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != channels)
            or (isinstance(shape[2], int) and shape[2] != bins)):
        raise dsp.AudioError(f"model {path.name} takes input {shape}, expected [1, {channels}, {bins}, T] "
                             f"(log-magnitude of a {geometry['n_fft']}-point STFT"
                             f"{', and the noise floor' if floor_hops else ''}; metadata floor_hops={floor_hops})")
    return session, meta, geometry, floor_hops


def check_stream_model(session, meta, geometry, path):
    """A streaming model: inputs logmag [1, F] and state [1, S], outputs mask and state_out, S from metadata."""
    bins = geometry["n_fft"] // 2 + 1
    size = meta_int(meta, "state_size", path, low=1)
    if geometry["window_samp"] != geometry["n_fft"] or geometry["n_fft"] != 2 * geometry["stft_hop_samp"]:
        raise dsp.AudioError(f"model {path.name}: a streaming model's frame is its FFT and two hops, not "
                             f"{geometry}")
    if meta.get("window", "sqrt-hann") != "sqrt-hann":
        raise dsp.AudioError(f"model {path.name} wants a {meta['window']} window; this pipeline has sqrt-hann")
    shapes = {i.name: i.shape for i in session.get_inputs()}
    if shapes != {"logmag": [1, bins], "state": [1, size]} or len(session.get_outputs()) != 2:
        raise dsp.AudioError(f"model {path.name} takes {shapes}, expected logmag [1, {bins}] and state [1, {size}]")
    mask = meta.get("mask", "real")
    want = {"real": [1, bins], "complex": [1, 2, bins]}.get(mask)
    if want is None or session.get_outputs()[0].shape != want:
        raise dsp.AudioError(f"model {path.name}: its mask ({mask}) comes out as {session.get_outputs()[0].shape}; "
                             f"this pipeline takes a real mask [1, {bins}] or a complex one [1, 2, {bins}]")


def consistent(stft, wave, target, iters):
    """Griffin-Lim rounds: keep the masked magnitude `target`, take the phase of what the inverse STFT
    actually produced. A mask changes bins independently, so the masked spectrum with the noisy phase is not
    the STFT of any signal; the overlap of its frames blurs what the mask did. Each round brings the STFT of
    the output closer to the target magnitude, starting from the noisy phase (a good start above 0 dB SNR)."""
    for _ in range(iters):
        spec = stft.forward(wave)
        wave = stft.inverse(target * spec / (np.abs(spec) + 1e-12))
    return wave


class ChainTail:
    """What both chains do around their model: blocks of any length in and out (dsp.Framer), MASK_POWER and
    SPECTRAL_FLOOR on the model's mask, and after the model the post-EQ, gate, output gain and limiter, timed per
    hop for the status line."""

    def init_mask(self, cfg, model_only):
        if not cfg.mask_power > 0:
            raise dsp.AudioError(f"MASK_POWER must be above 0 (1 = the model's mask), not {cfg.mask_power}")
        self.cfg, self.model_only = cfg, model_only
        self.floor = 0.0 if model_only else cfg.spectral_floor
        self.mask_power = 1.0 if model_only else cfg.mask_power

    def shape_mask(self, mask):
        if self.mask_power != 1.0:
            mask = mask ** np.float32(self.mask_power)
        return np.maximum(mask, self.floor)

    def init_tail(self, cfg, model_only, latency_samples):
        self.eq = dsp.BandBoost(cfg.eq_gain_db, cfg.eq_low_hz, cfg.eq_high_hz) if cfg.eq and not model_only else None
        self.gate = make_gate(cfg, self.hop_samp) if cfg.gate and not model_only else None
        self.framer = dsp.Framer(self.hop_samp, self.hop)
        self.latency_samples = latency_samples
        self.hop_budget_ms = self.hop_samp / dsp.SAMPLE_RATE * 1000
        self.startup_ms = cfg.startup_buffer_ms
        self.hop_ms = 0.0
        self.nan_warning = {}

    def process(self, block):
        return self.framer.process(dsp.sanitize(np.asarray(block, np.float32), self.nan_warning))

    def tail(self, out, t0):
        if not self.model_only:
            if self.eq:
                out = self.eq.process(out)
            if self.gate:
                out = self.gate.process(out)
            out = dsp.soft_limit(out * self.cfg.output_gain, self.cfg.limit_knee)
        self.hop_ms = (time.perf_counter() - t0) * 1000
        return out

    def status(self):
        return {"gate_open": self.gate.openness if self.gate else 1.0, "hop_ms": self.hop_ms,
                "hop_budget_ms": self.hop_budget_ms}


class MLChain(ChainTail):
    """The streaming chain. process() takes blocks of any length and returns the same length, delayed by
    exactly latency_samples; live audio and file mode both run it, so they cannot disagree."""

    def __init__(self, cfg, model_only=False, loaded=None):
        self.session, meta, geometry, floor_hops = loaded or load_model(cfg.model, cfg)
        # The crossfade only sums to one (constant overlap-add) at 50 % overlap: a hop is half the window.
        self.window_samp, n_fft, stft_hop = geometry["window_samp"], geometry["n_fft"], geometry["stft_hop_samp"]
        self.hop_samp = self.frame_samp = self.window_samp // 2
        self.input_name = self.session.get_inputs()[0].name
        self.log_eps = float(meta.get("log_eps", LOG_EPS_DEFAULT))
        # The floor model's memory: each recent hop's mean log|STFT| per bin, +inf for digital silence (so a
        # muted mic or the zeros before the first hop never pose as the noise), oldest first.
        try:
            self.silent_log = float(meta.get("silent_log", SILENT_LOG_DEFAULT))
        except ValueError:
            raise dsp.AudioError(f"model {Path(cfg.model).name} has a bad silent_log in its metadata: "
                                 f"{meta['silent_log']!r}") from None
        self.hop_stats = np.full((floor_hops, n_fft // 2 + 1), np.inf, np.float32) if floor_hops else None
        if cfg.phase_iters < 0 or cfg.phase_iters != int(cfg.phase_iters):
            raise dsp.AudioError(f"PHASE_ITERS must be a whole number >= 0 (0 = noisy phase), not {cfg.phase_iters}")
        self.init_mask(cfg, model_only)
        if cfg.pause_depth_db < 0 or not cfg.pause_below_db < cfg.pause_above_db:
            raise dsp.AudioError("PAUSE_DEPTH_DB must be >= 0 (0 = off) and PAUSE_BELOW_DB below PAUSE_ABOVE_DB, "
                                 f"not {cfg.pause_depth_db}, {cfg.pause_below_db}, {cfg.pause_above_db}")
        if not cfg.pause_release >= 1:
            raise dsp.AudioError(f"PAUSE_RELEASE must be at least 1 hop, not {cfg.pause_release}")
        self.pause = (dsp.Gate(10 ** (cfg.pause_below_db / 20), 10 ** (cfg.pause_above_db / 20), 0,
                               cfg.pause_release, cfg.pause_depth_db, cfg.gate_attack_samp, self.hop_samp)
                      if cfg.pause_depth_db and not model_only else None)
        self.pause_newer = np.zeros(2)  # the last window's newer half: energy passed by the mask, noisy energy
        self.stft = dsp.WindowSTFT(self.window_samp, n_fft, stft_hop)
        if not cfg.crossfade_power > 0:
            raise dsp.AudioError(f"CROSSFADE_POWER must be above 0 (1 = Hann), not {cfg.crossfade_power}")
        self.synthesis = dsp.crossfade_window(self.window_samp, cfg.crossfade_power)
        self.window = np.zeros(self.window_samp, np.float32)
        self.ola = np.zeros(self.window_samp, np.float32)
        # latency: one hop of framing + the half window still awaiting overlap
        self.init_tail(cfg, model_only, latency_samples=self.window_samp)

    def hop(self, new):
        t0 = time.perf_counter()
        h = self.hop_samp
        gain_in = 1.0 if self.model_only else self.cfg.input_gain
        self.window[:-h] = self.window[h:]
        self.window[-h:] = new * gain_in
        spec = self.stft.forward(self.window)
        mag = np.abs(spec)
        logmag = np.log(mag + self.log_eps).astype(np.float32)[None, None]
        if self.hop_stats is not None:
            logmag = np.concatenate([logmag, self.noise_floor(logmag[0, 0])[None, None, :, None]
                                     .repeat(logmag.shape[-1], -1)], 1)
        mask = self.shape_mask(self.session.run(None, {self.input_name: logmag})[0][0, 0])
        clean = self.stft.inverse(spec * mask)
        if not self.model_only:
            clean = consistent(self.stft, clean, mag * mask, self.cfg.phase_iters)
        self.ola += clean * self.synthesis
        out = self.ola[:h].copy()
        self.ola[:-h] = self.ola[h:]
        self.ola[-h:] = 0.0
        if self.pause:  # None in model_only
            out = self.pause_cut(out, mag, mask)
        return self.tail(out, t0)

    def pause_cut(self, out, mag, mask):
        """Turn down a hop in which the mask itself passes almost nothing: the model has called it noise
        only, so what it lets through is residue between words, which a listener (and DNSMOS BAK) hears
        as the room still being there. The hop that leaves now is the previous window's newer half plus
        this window's older half, so the share is taken over exactly those frames. It is a gate keyed on
        that share instead of the level: it opens within GATE_ATTACK_SAMP, so a word's first syllable is
        not cut, and closes over PAUSE_RELEASE hops, because the model also calls the weak hops inside a word
        at low SNR noise, and a cut that fell at once would chop them out (STOI counts each such dip)."""
        frames = self.stft.frames  # the window's frames
        noisy = np.square(mag[:, -frames:])
        passed = noisy * np.square(mask[:, -frames:])
        half = frames // 2
        older = np.array([passed[:, :half].sum(), noisy[:, :half].sum()])
        share = (self.pause_newer[0] + older[0]) / (self.pause_newer[1] + older[1] + 1e-12)
        self.pause_newer = np.array([passed[:, half:].sum(), noisy[:, half:].sum()])
        return self.pause.process(out, level=np.sqrt(share))  # the gate takes an RMS-like (amplitude) level

    def noise_floor(self, logmag):
        """model.noise_floor, streaming: this hop's summary (mean over the frames of the window's newer half)
        joins the last K, and the floor is their per-bin minimum."""
        stats = logmag[:, logmag.shape[-1] // 2:].mean(-1)
        self.hop_stats[:-1] = self.hop_stats[1:]
        self.hop_stats[-1] = np.inf if stats.mean() < self.silent_log else stats
        if not np.isfinite(self.hop_stats[:, 0]).any():  # nothing but silence so far: the current hop stands in
            return stats
        return self.hop_stats.min(0)


def make_gate(cfg, hop_samp):
    """The soft gate, its hold and release (counted in 100 ms hops) turned into this chain's hops."""
    in_hops = lambda n: max(1, round(n * GATE_HOP_SAMP / hop_samp)) if n else 0
    return dsp.Gate(cfg.gate_floor, cfg.gate_ceil, in_hops(cfg.gate_hold), in_hops(cfg.gate_release),
                    cfg.gate_depth_db, cfg.gate_attack_samp, hop_samp)


class StreamChain(ChainTail):
    """The low-latency chain (see the docstring): one 16 ms hop in, one out, the model's state carried between
    hops. Same contract as MLChain: process() takes any block length, returns it delayed by latency_samples."""

    def __init__(self, cfg, model_only=False, loaded=None):
        self.session, meta, geometry, _ = loaded or load_model(cfg.model, cfg)
        n_fft = geometry["n_fft"]
        self.hop_samp = self.frame_samp = geometry["stft_hop_samp"]
        self.log_eps = float(meta.get("log_eps", LOG_EPS_DEFAULT))
        self.silent_log = float(meta.get("silent_log", SILENT_LOG_DEFAULT))
        self.state = np.zeros((1, int(meta["state_size"])), np.float32)
        self.complex_mask = meta.get("mask", "real") == "complex"
        for _ in range(3):  # onnxruntime allocates on its first runs: not on the first hop of speech
            self.session.run(None, {"logmag": np.full((1, n_fft // 2 + 1), self.silent_log, np.float32),
                                    "state": self.state})
        self.window = np.sqrt(scipy.signal.get_window("hann", n_fft, fftbins=True)).astype(np.float32)  # periodic
        self.frame = np.zeros(n_fft, np.float32)
        self.ola = np.zeros(n_fft, np.float32)
        self.init_mask(cfg, model_only)
        # latency: one hop of framing + the frame's second half still awaiting overlap
        self.init_tail(cfg, model_only, latency_samples=n_fft)

    def hop(self, new):
        t0 = time.perf_counter()
        h = self.hop_samp
        self.frame[:-h] = self.frame[h:]
        self.frame[-h:] = new * (1.0 if self.model_only else self.cfg.input_gain)
        spec = np.fft.rfft(self.frame * self.window)
        logmag = np.log(np.abs(spec) + self.log_eps).astype(np.float32)[None]
        # Digital silence (a muted mic, the zeros before the first sound, the live warm-up) leaves the model's
        # state as it was: its running mean would sink to log(eps), and the first words after it would meet a
        # normalisation the model never trained on (training starts each example from zero state on audio).
        if logmag.mean() >= self.silent_log:
            mask, self.state = self.session.run(None, {"logmag": logmag, "state": self.state})
            gain = self.complex_gain(mask[0]) if self.complex_mask else self.shape_mask(mask[0])
            self.ola += np.fft.irfft(spec * gain, n=len(self.frame)).astype(np.float32) * self.window
        out = self.ola[:h].copy()
        self.ola[:-h] = self.ola[h:]
        self.ola[-h:] = 0.0
        return self.tail(out, t0)

    def complex_gain(self, mask):
        """A complex mask [2, F]: the floor and power shape its length; its direction, the phase turn, stays."""
        gain = mask[0] + 1j * mask[1]
        length = np.abs(gain)
        turn = np.where(length > 1e-6, gain / np.maximum(length, 1e-6), 1.0)
        return self.shape_mask(length) * turn


def model_path(cfg):
    return cfg.model_low_latency if cfg.low_latency else cfg.model


def make_chain(cfg, model_only=False):
    """The chain the model asks for: its metadata's kind picks MLChain (U-Net) or StreamChain."""
    loaded = load_model(model_path(cfg), cfg)
    chain = StreamChain if loaded[1].get("kind") == "stream" else MLChain
    return chain(cfg, model_only, loaded)


def build_parser():
    tunables = {k: v for k, v in globals().items() if k.isupper() and k not in NOT_FLAGS}
    return dsp.build_parser("Real-time ML noise suppressor (chain described in the docstring).", tunables,
                            __file__)


def default_config(**overrides):
    """The constants above as a config object, with keyword overrides (flag names with underscores)."""
    parser = build_parser()
    return dsp.with_overrides(parser.parse_args([]), overrides, parser)


def denoise_array(audio, model_path=None, model_only=False, low_latency=False):
    """16 kHz mono float32 in, same length out, aligned (for evaluate.py and tests). model_only=True runs
    the model's mask alone (no floor, EQ, gate, gains or limiter); low_latency=True the streaming model."""
    key = "model_low_latency" if low_latency else "model"
    cfg = default_config(low_latency=low_latency, **({key: model_path} if model_path else {}))
    return dsp.process_offline(make_chain(cfg, model_only), np.asarray(audio, np.float32))


def latency_ms(cfg=None):
    """The algorithmic latency, ms: the model's window (read from its metadata)."""
    cfg = cfg or default_config()
    return load_model(model_path(cfg), cfg)[2]["window_samp"] / dsp.SAMPLE_RATE * 1000


def parse_args(argv=None):
    """The command line; --low-latency brings its own live cushion and block unless they are given."""
    parser, unset = build_parser(), object()
    # argparse leaves preset attributes alone unless the flag is given: what is still unset was not asked for.
    args = parser.parse_args(argv, argparse.Namespace(out_target_ms=unset, block_ms=unset))
    for name in ("out_target_ms", "block_ms"):  # sized for the U-Net's 10-17 ms hops, most of --low-latency's delay
        if getattr(args, name) is unset:
            setattr(args, name, getattr(args, "low_latency_" + name) if args.low_latency else parser.get_default(name))
    return args


def main(argv=None):
    args = parse_args(argv)
    return dsp.run(args, lambda: make_chain(args), "hop")


if __name__ == "__main__":
    sys.exit(main())
