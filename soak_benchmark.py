"""Soak benchmark: one pipeline live for minutes through a private sound server, and whether its delay holds.

    python soak_benchmark.py --minutes 10 --hog          # the ML pipeline, with one CPU core kept busy
    python soak_benchmark.py --pipeline dsp --minutes 60

Starts the private PipeWire server the live tests use (tests/sound_server.py; Linux, its packages installed by
tests/install_sound_deps.sh), a fake microphone and the cable, and plays a known speech-like signal into the
microphone for the whole run. One stereo recorder takes the microphone (left) and the cable (right) from the same
graph clock, so the lag between the two channels is the true microphone-to-cable delay. Prints the pipeline's
underruns, overruns and device xruns after its warm-up, the delay at the start and at the end (cross-correlation,
to a fraction of a sample) and every minute between, the drift, and the pipeline's memory at start and end.
A benchmark, not a test: it prints figures and fails on nothing.
"""
import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))
import live_audio  # noqa: E402
from sound_server import (CABLE_SINK, CABLE_SOURCE, FAKE_MIC, FAKE_MIC_SINK, GRAPH_RATE_HZ, SoundServer,  # noqa: E402
                          SoundServerError, VirtualMic, ensure_packages)

MINUTES = 10.0          # [0.5, 600] length of the run
SIGNAL_S = 30.0         # [5, 300] length of the looped test signal; the delay is measured over windows of it
WINDOW_S = 10.0         # [2, 60] each delay measurement correlates this much audio
WARMUP_S = 20.0         # [1, 120] not measured: start-up, and PipeWire's ALSA bridge shifting its buffering once
                        # (never less than until the pipeline has fixed its delay: see first_window_s)
MAX_DELAY_MS = 1000.0   # [50, 5000] the delay search range
PIPELINES = {"ml": "ml_denoiser_pipeline.py", "dsp": "dsp_filter_pipeline.py"}


def speechlike(seconds, rate=GRAPH_RATE_HZ, seed=0):
    """Harmonics of a gliding pitch in syllables, with pauses and a little noise: what a denoiser passes, with a
    shape that makes the cross-correlation peak unambiguous."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.3 * t) + 15 * np.sin(2 * np.pi * 1.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 25))
    syllables = np.clip(np.sin(2 * np.pi * 3.1 * t + 2 * np.sin(2 * np.pi * 0.23 * t)), 0, None)
    words = (np.sin(2 * np.pi * 0.4 * t) > -0.6).astype(float)
    x = 0.08 * voice * syllables * words + 0.002 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def delay_ms(mic, cable, rate=GRAPH_RATE_HZ, max_ms=MAX_DELAY_MS):
    """Lag of cable behind mic by cross-correlation, refined between samples by a parabola through the peak."""
    from scipy.signal import correlate
    max_lag = int(max_ms * rate / 1000)
    cc = correlate(cable, mic, mode="full", method="fft")[len(mic) - 1:len(mic) - 1 + max_lag]
    k = int(np.argmax(cc))
    shift = 0.0
    if 0 < k < len(cc) - 1:
        a, b, c = cc[k - 1], cc[k], cc[k + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
    return 1000.0 * (k + shift) / rate


def rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def hog():
    """A busy loop on CPU 0, the rest of the machine left to the pipeline and the sound server."""
    code = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run(args):
    reason = ensure_packages()
    if reason:
        raise SystemExit(f"error: {reason}")
    server = SoundServer()
    procs = []
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        server.start()
        VirtualMic(server, FAKE_MIC_SINK, FAKE_MIC, "Fake mic sink", "Fake microphone")
        VirtualMic(server, CABLE_SINK, CABLE_SOURCE, "Denoiser cable", "Denoised microphone")
        server.make_null_sink("probe", "Soak probe", channels=2)
        server.link(FAKE_MIC_SINK + ":monitor_MONO", "probe:playback_FL")
        server.link(CABLE_SINK + ":monitor_MONO", "probe:playback_FR")
        wav = work / "signal.wav"
        sf.write(wav, speechlike(args.signal_s), GRAPH_RATE_HZ)
        recorder = server.record("probe.monitor", str(work / "probe.raw"), channels=2)
        recording_since = time.monotonic()
        env = dict(server.env, PYTHONUNBUFFERED="1")
        script = REPO / PIPELINES[args.pipeline]
        log_path = work / "pipeline.log"  # a file, not a pipe: an hour of status lines would fill a pipe and block it
        with open(log_path, "w") as log:
            pipeline = subprocess.Popen([sys.executable, str(script), "--mic", FAKE_MIC, "--cable", CABLE_SINK,
                                         "--status-interval-s", "1", "--no-idle", *args.extra], env=env, cwd=REPO,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        procs.append(pipeline)
        if args.hog:
            procs.append(hog())
        started = time.monotonic()
        player = None
        rss_start = fixed_s = None
        while time.monotonic() - started < args.minutes * 60:
            if pipeline.poll() is not None:
                raise SystemExit(f"error: the pipeline exited early:\n{log_path.read_text(errors='replace')[-4000:]}")
            if fixed_s is None and live_audio.FIXED_LINE in log_path.read_text(errors="replace"):
                fixed_s = time.monotonic() - recording_since  # in the recording's time, to 0.1 s
            if player is None or player.poll() is not None:
                player = server.play(str(wav), FAKE_MIC_SINK)
            if rss_start is None and time.monotonic() - started > args.warmup_s:
                rss_start = rss_mb(pipeline.pid)
            time.sleep(0.1)
        rss_end = rss_mb(pipeline.pid)
        pipeline.send_signal(signal.SIGINT)
        pipeline.wait(timeout=30)
        out = log_path.read_text(errors="replace")
        player.terminate()
        audio = SoundServer.stop_recording(recorder)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    if args.keep:
        np.save(work / "probe.npy", audio)
        print(f"recording kept: {work / 'probe.npy'}")
    report(args, out, audio, rss_start, rss_end, first_window_s(args.warmup_s, fixed_s, args.extra))
    return 0


def first_window_s(warmup_s, fixed_s, extra=()):
    """Where in the recording the delay is first measured: after the warm-up, and never before the moment the
    pipeline's own meter takes its delay_start_ms (DELAY_START_S, or the pipeline's --delay-start-s, after it said
    its delay was fixed at fixed_s: while it settles, a dry cushion refills and grows the delay by design)."""
    if fixed_s is None:
        return warmup_s
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--delay-start-s", type=float, default=live_audio.DELAY_START_S)
    after = flags.parse_known_args(list(extra))[0].delay_start_s
    return max(warmup_s, fixed_s + after)


def underruns_by_minute(out):
    """[(minute, underruns in it)] where any, from the status lines the pipeline prints once a second (the n-th
    line is about n seconds after the devices started)."""
    counts = [int(line.split(" under ")[1].split()[0]) for line in out.splitlines()
              if line.startswith(("denoising ", "BYPASS ")) and " under " in line]
    per_minute = {}
    for i, (before, now) in enumerate(zip([0] + counts, counts)):
        if now > before:
            per_minute[(i + 1) // 60] = per_minute.get((i + 1) // 60, 0) + now - before
    return sorted(per_minute.items())


def report(args, out, audio, rss_start, rss_end, first_s):
    stats = next((line for line in out.splitlines() if line.startswith("stats:")), "stats: (none)")
    settled = dict(kv.split("=") for kv in stats.split()[1:] if kv.startswith("settled_"))
    rate, win = GRAPH_RATE_HZ, int(args.window_s * GRAPH_RATE_HZ)
    first = int(first_s * rate)
    starts = list(range(first, len(audio) - win, 60 * rate)) or [first]
    trace = [(s / rate, delay_ms(audio[s:s + win, 0], audio[s:s + win, 1], max_ms=args.max_delay_ms)) for s in starts]
    last = len(audio) - win - rate
    end = delay_ms(audio[last:last + win, 0], audio[last:last + win, 1], max_ms=args.max_delay_ms)
    levels = 20 * np.log10(np.sqrt(np.mean(audio.astype(np.float64) ** 2, axis=0)) + 1e-12)
    print(f"levels: microphone {levels[0]:.1f} dBFS, cable {levels[1]:.1f} dBFS")
    print(f"soak: {args.pipeline} pipeline, {len(audio) / rate / 60:.1f} min recorded"
          + (", one core busy (a busy loop on CPU 0)" if args.hog else ""))
    print("pipeline: " + " ".join(line for line in out.splitlines() if line.startswith(("latency:", "output cushion"))))
    by_minute = underruns_by_minute(out)
    if by_minute:
        print("underruns by minute (where any): " + ", ".join(f"{m} min {n}" for m, n in by_minute))
    print(f"after warm-up: underruns={settled.get('settled_underruns', '?')} "
          f"overruns={settled.get('settled_overruns', '?')} realigns={settled.get('settled_realigns', '?')} "
          f"device_xruns={settled.get('settled_device_xruns', '?')} "
          f"microphone short by {settled.get('settled_mic_short_ms', '?')} ms (audio lost before the pipeline)")
    print(f"delay measured from {first_s:.1f} s of the recording (warm-up {args.warmup_s:g} s, or until the pipeline's "
          f"delay was fixed)")
    print("delay by minute: " + ", ".join(f"{t / 60:.0f} min {d:.2f} ms" for t, d in trace))
    print(f"delay at start: {trace[0][1]:.2f} ms, at end: {end:.2f} ms, drift: {end - trace[0][1]:+.2f} ms")
    own = live_audio.parse_stats(out) or {}
    if "delay_start_ms" in own and "delay_end_ms" in own:
        print(f"the pipeline's own delay meter: {own['delay_start_ms']:.2f} ms after settling, "
              f"{own['delay_end_ms']:.2f} ms at the end")
    print(f"memory (RSS): {rss_start:.1f} MB after warm-up, {rss_end:.1f} MB at the end")


def main(argv=None):
    import dsp
    ap = dsp.OneLineParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), default="ml")
    ap.add_argument("--hog", action="store_true", help="keep one CPU core busy for the whole run")
    dsp.add_constant_flags(ap, globals(), ["MINUTES", "SIGNAL_S", "WINDOW_S", "WARMUP_S", "MAX_DELAY_MS"], __file__)
    ap.add_argument("--keep", action="store_true", help="keep the recording (probe.npy) in the work folder")
    ap.add_argument("extra", nargs="*", help="flags for the pipeline, after --")
    args = ap.parse_args(argv)
    if args.warmup_s + args.window_s + 1 > args.minutes * 60:
        raise SystemExit("error: the run is shorter than the warm-up plus one measurement window")
    try:
        return run(args)
    except SoundServerError as exc:
        raise SystemExit(f"error: the sound server: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
