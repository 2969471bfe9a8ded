"""Lightweight DSP noise filter: microphone -> high-pass -> soft gate -> virtual cable. No model, ~5 ms latency.

    python dsp_filter_pipeline.py                                 # live: default mic -> virtual cable
    python dsp_filter_pipeline.py --input noisy.wav --output out.wav   # file mode, same code path
    python dsp_filter_pipeline.py --bench                         # time per frame, real-time factor, latency

For machines where the ML pipeline is too heavy, or as a fallback. It removes what a filter can: rumble,
hum and desk thumps below HPF_CUTOFF_HZ, and the room between sentences (the gate). It cannot remove noise
that overlaps speech; that is what ml_denoiser_pipeline.py is for.
One frame, top to bottom (DSPChain.frame): 5 ms of microphone samples -> 4th-order Butterworth high-pass
(state carried across frames, so no clicks) -> soft gate with the ML pipeline's floor/ceil/hold behaviour ->
the cable. Latency is one frame (FRAME_SAMP, 5 ms). Budget: each frame in well under 5 ms.
"""
import sys
import time

import numpy as np

import dsp

# ---- tunables: edit here or pass --flag-name VALUE; [low, high] is the range each may take -------------------
FRAME_SAMP = 80            # [1, 1600] samples per frame (5 ms) = the latency; smaller costs more CPU per second
HPF_CUTOFF_HZ = 80.0       # [10, 1000] high-pass corner; 60 keeps deep voices full .. 150 removes more rumble
HPF_ORDER = 4              # [1, 8] Butterworth order; 4 = 24 dB/octave
GATE = True                # soft noise gate on (--no-gate to bypass)
GATE_FLOOR = 0.0003        # [0, 1] RMS at which the gate is fully closed (-70 dBFS); raise if background leaks
GATE_CEIL = 0.004          # [0, 1] RMS at which the gate is fully open (-48 dBFS); lower if soft speech is dimmed
GATE_HOLD_MS = 800.0       # [0, 10000] gate stays open this long after the level drops; keeps consonants and pauses
GATE_RELEASE_MS = 300.0    # [1, 10000] fade from open to closed after the hold; 100 abrupt .. 1000 slow
GATE_DEPTH_DB = 60.0       # [0, 120] attenuation of a fully closed gate; 30 subtle .. 80 near-silent
GATE_ATTACK_SAMP = 40      # [1, 1600] opening ramp (2.5 ms) inside a frame, so opening does not click
GATE_RMS_MS = 20.0         # [0, 1000] level is measured over this long; 5 ms frames alone would flicker on noise
OUTPUT_GAIN = 1.0          # [0.01, 10] applied after the gate
LIMIT_KNEE = 0.9           # [0.1, 1] soft limiter starts rounding peaks here (full scale = 1.0)
STARTUP_BUFFER_MS = 300    # [0, 10000] live mode: audio at start during which over/underruns are expected, not counted
MIC = None                 # input device: index or name substring; None = the system's default input
CABLE = None               # output device: index or name substring; None = first virtual cable found
# ------------------------------------------------------------------------------------------------------------
NOT_FLAGS = {"NOT_FLAGS"}


class DSPChain:
    """Same contract as MLChain: process() takes any block length and returns it delayed by latency_samples."""

    def __init__(self, cfg):
        if cfg.frame_samp < 1:
            raise dsp.AudioError("FRAME_SAMP must be at least 1")
        self.cfg = cfg
        frame_ms = cfg.frame_samp / dsp.SAMPLE_RATE * 1000
        self.hpf = dsp.HighPass(cfg.hpf_cutoff_hz, cfg.hpf_order, dsp.SAMPLE_RATE)
        self.gate = (dsp.Gate(cfg.gate_floor, cfg.gate_ceil, round(cfg.gate_hold_ms / frame_ms),
                              cfg.gate_release_ms / frame_ms, cfg.gate_depth_db, cfg.gate_attack_samp,
                              cfg.frame_samp) if cfg.gate else None)
        # The gate looks at a running mean power over GATE_RMS_MS, fed one 5 ms frame at a time.
        self.smooth = float(np.exp(-frame_ms / cfg.gate_rms_ms)) if cfg.gate_rms_ms > 0 else 0.0
        self.power = 0.0
        self.framer = dsp.Framer(cfg.frame_samp, self.frame)
        self.latency_samples = self.frame_samp = cfg.frame_samp
        self.hop_budget_ms = frame_ms
        self.startup_ms = cfg.startup_buffer_ms
        self.hop_ms = 0.0
        self.nan_warning = {}

    def process(self, block):
        return self.framer.process(dsp.sanitize(np.asarray(block, np.float32), self.nan_warning))

    def frame(self, x):
        t0 = time.perf_counter()
        y = self.hpf.process(x)
        if self.gate:
            self.power = self.smooth * self.power + (1 - self.smooth) * float(np.mean(np.square(y)))
            y = self.gate.process(y, level=np.sqrt(self.power))
        y = dsp.soft_limit(y * self.cfg.output_gain, self.cfg.limit_knee)
        self.hop_ms = (time.perf_counter() - t0) * 1000
        return y

    def status(self):
        return {"gate_open": self.gate.openness if self.gate else 1.0, "hop_ms": self.hop_ms,
                "hop_budget_ms": self.hop_budget_ms}


def build_parser():
    tunables = {k: v for k, v in globals().items() if k.isupper() and k not in NOT_FLAGS}
    return dsp.build_parser("Lightweight DSP noise filter (high-pass + soft gate).", tunables, __file__)


def default_config(**overrides):
    """The constants above as a config object, with keyword overrides (flag names with underscores)."""
    parser = build_parser()
    return dsp.with_overrides(parser.parse_args([]), overrides, parser)


def denoise_array(audio):
    """16 kHz mono float32 in, same length out, aligned (for evaluate.py and tests)."""
    return dsp.process_offline(DSPChain(default_config()), np.asarray(audio, np.float32))


def latency_ms(cfg=None):
    cfg = cfg or default_config()
    return cfg.frame_samp / dsp.SAMPLE_RATE * 1000


def main(argv=None):
    args = build_parser().parse_args(argv)
    return dsp.run(args, lambda: DSPChain(args), "frame")


if __name__ == "__main__":
    sys.exit(main())
