"""live_audio.py: buffering, realignment, device lookup, and both pipelines live through a real sound server.

The buffering tests drive the engine's real callbacks and processing thread with a pass-through chain. The rest
run against a private PipeWire (tests/sound_server.py): a fake microphone fed by paplay, the project's cable,
and a stereo probe recording what the microphone gave and what reached the cable, sample-synchronously.
"""
import io
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import devices  # noqa: E402
from dsp import process_offline as dsp_process_offline  # noqa: E402
import live_audio  # noqa: E402
from sound_server import FAKE_MIC, FAKE_MIC_SINK, SoundServer, skip_if_microphone_lost  # noqa: E402

RATE = 16000
DEV_NOISY = REPO.parent / "shared" / "data" / "dev" / "noisy"

# A stand-in chain for live tests of the streaming machinery alone: a pass-through with a fixed delay.
STANDIN = '''
import argparse, sys, time
import numpy as np
sys.path.insert(0, %r)
import live_audio

class DelayChain:
    def __init__(self, delay):
        self.latency_samples = delay
        self.line = np.zeros(delay, np.float32)
    def process(self, x):
        joined = np.concatenate([self.line, x])
        self.line = joined[len(x):]
        return joined[:len(x)].copy()
    def status(self):
        return {"gate_open": 1.0, "hop_ms": 0.1, "hop_budget_ms": 10.0}

parser = argparse.ArgumentParser()
live_audio.add_arguments(parser)
args = parser.parse_args()
sys.exit(live_audio.run_live(DelayChain(320), args))
''' % str(REPO)


class DelayChain:
    """Pass-through with a fixed delay; optionally stalls once (sleeps) after `stall_after` samples, or takes
    `hop_s` on every `hop`-th sample boundary like a model that runs once per hop."""

    def __init__(self, delay=320, stall_after=None, stall_s=0.0, hop=None, hop_s=0.0):
        self.latency_samples = delay
        self.line = np.zeros(delay, np.float32)
        self.seen = 0
        self.stall_after, self.stall_s = stall_after, stall_s
        self.hop, self.hop_s = hop, hop_s

    def process(self, x):
        joined = np.concatenate([self.line, x])
        self.line = joined[len(x):]
        before, self.seen = self.seen, self.seen + len(x)
        if self.stall_after is not None and self.seen >= self.stall_after:
            self.stall_after = None
            time.sleep(self.stall_s)
        if self.hop and self.seen // self.hop > before // self.hop:
            time.sleep(self.hop_s)
        return joined[:len(x)].copy()

    def status(self):
        return {"gate_open": 1.0, "hop_ms": 0.1, "hop_budget_ms": 10.0}


# ---------------------------------------------------------------------------------------------------------------
# Buffering, without devices: the engine's callbacks are driven the way PortAudio drives them
# ---------------------------------------------------------------------------------------------------------------
def test_ring_buffer_wraps_drops_newest_when_full_and_skips():
    ring = live_audio.RingBuffer(8)
    assert ring.write(np.arange(6, dtype=np.float32)) == 0
    out = np.zeros(4, np.float32)
    assert ring.read_into(out) == 4 and out.tolist() == [0, 1, 2, 3]
    assert ring.write(np.arange(6, 13, dtype=np.float32)) == 1  # 2 left + 7 new > 8: the newest is dropped
    ring.skip(3)
    out = np.zeros(8, np.float32)
    assert ring.read_into(out) == 5 and out[:5].tolist() == [7, 8, 9, 10, 11]
    assert ring.read_into(out) == 0


def _feed(engine, signal_, block=160, pace_s=None, outputs_per_input=1, snapshot_after=None, lost=()):
    """Push signal_ through engine.on_input/on_output in blocks. pace_s=None waits for the processing thread
    after each input block (deterministic); a number paces the blocks in real time like a device clock.
    snapshot_after=n copies engine.counts into engine.snapshot after n blocks. Input blocks whose index is in
    `lost` are never delivered (a capture skip, the sound server's rate matching); the output still plays."""
    indata = np.zeros((block, 1), np.float32)
    outdata = np.zeros((block, 1), np.float32)
    played = []
    engine.start_processing()
    started = time.perf_counter()
    try:
        for n, i in enumerate(range(0, len(signal_) - block + 1, block)):
            if n not in lost:
                indata[:, 0] = signal_[i:i + block]
                target = engine.out_ring.written + block
                engine.on_input(indata, block, None, 0)
            if pace_s is None:
                deadline = time.monotonic() + 5
                while n not in lost and engine.out_ring.written < target \
                        and engine.out_ring.depth() < engine.out_ring.capacity and time.monotonic() < deadline:
                    time.sleep(0.0005)
            else:
                delay = started + (n + 1) * pace_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if n % outputs_per_input == 0:
                engine.on_output(outdata, block, None, 0)
                played.append(outdata[:, 0].copy())
            if n + 1 == snapshot_after:
                engine.snapshot = dict(engine.counts)
    finally:
        engine.stop_processing()
    assert engine.error is None
    return np.concatenate(played)


def _lag(x, y, max_lag=16000):
    """Lag of y behind x (samples) where y[n] == x[n - lag] holds for most non-zero samples."""
    from scipy.signal import correlate
    cc = correlate(y, x, mode="full", method="fft")
    mid = len(x) - 1
    return int(np.argmax(cc[mid:mid + max_lag]))


def test_engine_passes_audio_through_exactly_with_constant_delay():
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320), out_target_ms=30)
    y = _feed(engine, x)
    lag = _lag(x, y)
    assert lag >= 320
    assert np.array_equal(y[lag:], x[:len(y) - lag]), "output must be the input, delayed, bit for bit"
    assert not np.any(y[:lag]), "before the cushion fills the output is silence"
    assert engine.counts["underruns"] == engine.counts["overruns"] == engine.counts["realigns"] == 0


def test_output_backlog_is_cut_back_instead_of_growing():
    """Input arriving twice as fast as the output plays (a fast microphone clock, a stalled output)."""
    rng = np.random.default_rng(2)
    x = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=30, out_realign_ms=40)
    y = _feed(engine, x, outputs_per_input=2)
    assert engine.counts["realigns"] >= 3
    assert engine.counts["overruns"] == 0
    # Latency stays bounded: never more than cushion + threshold + one block queued.
    assert engine.out_ring.depth() <= (30 + 40) * RATE // 1000 + 2 * 160
    # What is played is still real input (dropped, never garbled): every played block is a block of x.
    blocks = {x[i:i + 160].tobytes() for i in range(0, len(x) - 159)}
    played = [y[i:i + 160] for i in range(0, len(y) - 159, 160) if np.any(y[i:i + 160])]
    assert played and all(b.tobytes() in blocks for b in played[1:])


def test_a_stall_is_a_faded_dropout_and_the_delay_does_not_move():
    """The chain stalls 400 ms once, in real time: the output fades out, plays silence (an underrun, counted),
    the input backlog is dropped (a realign), and afterwards the delay is exactly what it was: the dropout skips
    the audio it stood in for instead of adding its length to the delay. Both edges are faded, never a jump."""
    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal(2 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320, stall_after=RATE // 2, stall_s=0.4), out_target_ms=30,
                                   in_realign_ms=150, settle_delay_s=0)
    y = _feed(engine, x, pace_s=0.01)
    assert engine.counts["underruns"] >= 1 and engine.counts["overruns"] == 0
    before = _lag(x[:RATE // 2], y[:RATE // 2 + 4000])
    tail = slice(len(y) - RATE // 2, len(y))
    after = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]))
    assert after == before, "the delay after the stall must be the delay before it, to the sample"
    n = np.arange(len(y))
    src = np.clip(n - before, 0, len(x) - 1)
    exact = (y == x[src]) & (n >= before)
    silent = y == 0
    faded = ~exact & ~silent
    assert exact.mean() > 0.7 and silent[RATE // 2 + 4000:].any()
    # What is neither silence nor the input is the input scaled by a ramp: at most FADE_MS each side of a gap.
    ratio = np.abs(y[faded]) / np.maximum(np.abs(x[src][faded]), 1e-9)
    fade = int(live_audio.FADE_MS * RATE / 1000)
    assert np.all(ratio <= 1.0 + 1e-6) and faded.sum() <= 2 * fade * max(1, engine.counts["underruns"])


def test_audio_lost_at_the_source_reanchors_instead_of_falling_silent():
    """A capture overrun in the sound server loses 150 ms of microphone audio: what the dropout's silence stood for
    never arrives. The output must not wait for it forever: it refills its cushion (a realign, counted) and plays
    the microphone again, a clean copy at the delay it had before."""
    rng = np.random.default_rng(6)
    x = (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=30, settle_delay_s=0)
    y = _feed(engine, x, lost=set(range(100, 115)))  # blocks the microphone never delivers
    assert engine.counts["underruns"] >= 1 and engine.counts["realigns"] == 1
    # What the stats line reports as settled_mic_short_ms: the cable took 150 ms the microphone never gave.
    assert engine.out_frames - engine.in_frames == 15 * 160
    first = _lag(x[:RATE], y[:RATE + 4000])
    tail = slice(len(y) - RATE // 2, len(y))
    after = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]), max_lag=2 * RATE)
    assert np.array_equal(y[tail], x[tail.start - after:tail.stop - after]), "the output plays the microphone again"
    # The cushion is full again: the delay is the one it had, to within the block the refill ends on.
    assert abs(after - first) <= 160 + int(live_audio.FADE_MS * RATE / 1000)


def test_audio_lost_in_small_pieces_refills_the_cushion_once():
    """After the delay is fixed the sound server drops a microphone block now and then (a slowed machine): each
    loss leaves the ring a block lower, and the third leaves it too low to play on. Paying the dropout's debt from
    what arrives next would keep it there, at the edge of every later bit of jitter; instead the output refills
    its cushion (one realign) and is back at the delay it had, a clean copy, after one short silence."""
    rng = np.random.default_rng(8)
    x = (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=30, settle_delay_s=0)
    lost = {100, 130, 160}
    y = _feed(engine, x, lost=lost)
    assert engine.counts["underruns"] == 1 and engine.counts["realigns"] == 1
    assert engine.out_frames - engine.in_frames == len(lost) * 160
    first = _lag(x[:RATE], y[:RATE + 4000])
    tail = slice(len(y) - RATE // 2, len(y))
    after = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]), max_lag=2 * RATE)
    assert np.array_equal(y[tail], x[tail.start - after:tail.stop - after]), "the output plays the microphone again"
    assert abs(after - first) <= 160 + int(live_audio.FADE_MS * RATE / 1000)
    # One silence, about as long as the cushion it refills: not REANCHOR_MS of waiting for audio that never comes.
    active = np.abs(y) > 0
    start = np.flatnonzero(active)[0]
    quiet = np.flatnonzero(~active[start:]) + start
    longest = max(len(run) for run in np.split(quiet, np.flatnonzero(np.diff(quiet) > 1) + 1))
    assert longest <= (30 + live_audio.FADE_MS) * RATE / 1000 + 2 * 160, longest


def test_while_settling_running_dry_grows_the_delay_once():
    """In the first SETTLE_DELAY_S the devices' own jitter is found: a stall then refills the cushion, so the
    delay grows by what was missing (once, reported as settle_growth_ms) and stays there."""
    rng = np.random.default_rng(4)
    x = (0.1 * rng.standard_normal(2 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320, stall_after=RATE // 2, stall_s=0.1), out_target_ms=30,
                                   settle_delay_s=5.0)
    y = _feed(engine, x, pace_s=0.01)
    before = _lag(x[:RATE // 2], y[:RATE // 2 + 4000])
    tail = slice(len(y) - RATE // 2, len(y))
    after = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]))
    assert engine.counts["underruns"] == 1 and engine.settle_growth_ms > 0
    assert after - before == pytest.approx(engine.settle_growth_ms * RATE / 1000, abs=200)
    assert np.array_equal(y[tail], x[tail.start - after:tail.stop - after])


@pytest.mark.parametrize("lost_blocks", [0, 4])
def test_settling_ends_with_the_cushion_full(lost_blocks):
    """40 ms of microphone that never arrive while settling leave the ring 40 ms short of its 60 ms cushion, but
    never dry: settling ends by refilling it (once, counted in settle_growth_ms), so the delay is fixed with the
    whole cushion and the mic-to-cable lag is back where it started. A ring that stayed full is left alone."""
    rng = np.random.default_rng(7)
    x = (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=60, settle_delay_s=1.5)
    y = _feed(engine, x, lost=set(range(50, 50 + lost_blocks)))
    assert engine.delay_fixed()
    assert engine.counts["underruns"] == engine.counts["realigns"] == 0
    first = _lag(x[:RATE // 4], y[:RATE // 4 + 4000])
    tail = slice(len(y) - RATE // 2, len(y))
    after = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]), max_lag=2 * RATE)
    assert np.array_equal(y[tail], x[tail.start - after:tail.stop - after]), "the output plays the microphone"
    if lost_blocks:
        assert engine.settle_growth_ms == pytest.approx(40, abs=10 + live_audio.FADE_MS)
        assert engine.settle_topup_ms == engine.settle_growth_ms
        assert abs(after - first) <= 160 + int(live_audio.FADE_MS * RATE / 1000)
    else:
        assert engine.settle_growth_ms == engine.settle_topup_ms == 0 and after == first


def test_warm_up_sizes_the_cushion_once_for_a_chain_that_runs_once_per_hop():
    """A chain that spends 120 ms on every 200 ms hop (as the ML chain runs its model once per hop) would drain a
    fixed 30 ms cushion at every hop. warm_up times it on silence before the devices start; the cushion then
    covers it, nothing underruns or realigns, and the delay is the same at the end as at the start."""
    rng = np.random.default_rng(5)
    x = (0.1 * rng.standard_normal(4 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320, hop=3200, hop_s=0.12), out_target_ms=30, out_realign_ms=80)
    burst = engine.warm_up(1.0, margin=1.5)
    assert 1.5 * 115 <= burst <= 1.5 * 170 and engine.cushion_ms == pytest.approx(min(30 + burst, 250))
    y = _feed(engine, x, pace_s=0.01)
    assert engine.counts["underruns"] == engine.counts["realigns"] == engine.counts["overruns"] == 0, engine.counts
    first = _lag(x[:RATE], y[:RATE + 8000])
    tail = slice(len(y) - RATE // 2, len(y))
    last = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]))
    assert first == last
    assert np.array_equal(y[tail], x[tail.start - last:tail.stop - last]), "the last half second is clean"


class _Times:
    """What PortAudio hands a callback as time_info (seconds on the streams' shared clock)."""

    def __init__(self, adc=0.0, dac=0.0):
        self.inputBufferAdcTime, self.outputBufferDacTime, self.currentTime = adc, dac, adc


def _clocked(engine, x, out_device_s):
    """Feed x through the engine in 10 ms blocks on a shared device clock, waiting for the chain after each input
    block; out_device_s(n) is what the output device buffers at block n. Returns (played blocks, ring depths)."""
    indata, outdata, played, depths = np.zeros((160, 1), np.float32), np.zeros((160, 1), np.float32), [], []
    engine.start_processing()
    try:
        for n in range(len(x) // 160):
            indata[:, 0] = x[n * 160:(n + 1) * 160]
            target = engine.out_ring.written + 160
            engine.on_input(indata, 160, _Times(adc=n * 0.01), 0)
            deadline = time.monotonic() + 5
            while engine.out_ring.written < target and time.monotonic() < deadline:
                time.sleep(0.0005)
            engine.on_output(outdata, 160, _Times(adc=n * 0.01, dac=n * 0.01 + out_device_s(n)), 0)
            played.append(outdata[:, 0].copy())
            depths.append(engine.out_ring.depth())
    finally:
        engine.stop_processing()
    return played, depths


def test_the_servo_keeps_a_quarter_of_the_cushion_when_the_devices_add_more_than_it_holds():
    """The output device buffers 45 ms more (a server-side shift) on a 20 ms cushion: the servo may read faster
    only while a quarter of the cushion stays after the read, so the delay stays above target but the ring keeps a
    margin for jitter instead of running bare (every late callback then a dropout)."""
    x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(6 * RATE) / RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320), out_target_ms=20, settle_delay_s=0.5, servo_time_s=0.5)
    depths = _clocked(engine, x, lambda n: 0.02 if n < 300 else 0.065)[1]
    assert engine.servo_rate > 0 and engine.delay_ms() > engine.target_delay_ms + 10  # it wanted more
    assert min(depths[400:]) >= engine._fade + engine._out_target // 4, min(depths[400:])
    assert engine.counts["underruns"] == engine.counts["realigns"] == 0


def test_delay_meter_reads_the_delay_and_the_servo_undoes_what_the_devices_added():
    """Devices clocked at 10 ms blocks: the output device first buffers 20 ms, then 25 ms more (what an xrun in
    the sound server's bridge leaves behind). The meter reads mic-to-cable delay from PortAudio's timestamps as
    the audio itself shows it; the servo then plays the output up to 1 % faster until the delay is back where it
    was fixed, without a dropout or a click."""
    t = np.arange(14 * RATE) / RATE
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    x[::997] += 0.2  # marks that make the lag unambiguous
    engine = live_audio.LiveEngine(DelayChain(320), out_target_ms=60, settle_delay_s=0.5, servo_time_s=0.5)
    seen = {}

    def out_device_s(n):
        if n == 400:
            seen["before_jump"] = engine.delay_ms()  # after block 399 played
        return 0.020 if n < 400 else 0.045
    played = _clocked(engine, x, out_device_s)[0]
    before_jump = seen["before_jump"]
    y = np.concatenate(played)
    first = _lag(x[RATE:2 * RATE], y[RATE:2 * RATE + 4000])
    assert before_jump == pytest.approx(1000 * first / RATE + 20, abs=0.5), "the meter reads the true delay"
    assert engine.target_delay_ms == pytest.approx(before_jump, abs=0.5)
    tail = slice(len(y) - RATE, len(y))
    last = _lag(x, np.concatenate([np.zeros(tail.start, np.float32), y[tail]]), max_lag=2 * RATE)
    assert 1000 * last / RATE + 45 == pytest.approx(engine.target_delay_ms, abs=1.0), "back where it was fixed"
    assert engine.delay_ms() == pytest.approx(engine.target_delay_ms, abs=1.0) and engine.servo_rate == 0.0
    assert engine.counts["underruns"] == engine.counts["realigns"] == engine.counts["overruns"] == 0
    # No click while it stretched: the sine moves at most 2 pi 220 / 16000 x 0.3 per sample, the marks aside.
    steady = np.diff(y[RATE:])
    assert np.mean(np.abs(steady) > 0.3 * 2 * np.pi * 220 / RATE * 1.05) < 0.01


def test_a_host_api_without_timestamps_leaves_the_delay_alone():
    """Host APIs that report 0 for the buffer times (some Windows ones): no meter reading, so no servo; the audio
    passes exactly as without one."""
    rng = np.random.default_rng(9)
    x = (0.1 * rng.standard_normal(2 * RATE)).astype(np.float32)
    engine = live_audio.LiveEngine(DelayChain(320), out_target_ms=30, settle_delay_s=0.2)
    indata, outdata, played = np.zeros((160, 1), np.float32), np.zeros((160, 1), np.float32), []
    engine.start_processing()
    try:
        for n in range(len(x) // 160):
            indata[:, 0] = x[n * 160:(n + 1) * 160]
            target = engine.out_ring.written + 160
            engine.on_input(indata, 160, _Times(), 0)
            deadline = time.monotonic() + 5
            while engine.out_ring.written < target and time.monotonic() < deadline:
                time.sleep(0.0005)
            engine.on_output(outdata, 160, _Times(adc=n * 0.01 + 3.0, dac=0.0), 0)
            played.append(outdata[:, 0].copy())
    finally:
        engine.stop_processing()
    y = np.concatenate(played)
    assert engine.delay_ms() is None and engine.target_delay_ms is None and engine.servo_rate == 0.0
    lag = _lag(x[:RATE], y[:RATE + 4000])
    assert np.array_equal(y[lag + 1000:], x[1000:len(y) - lag])


def test_output_underrun_gives_silence_not_stale_audio():
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=10)
    engine.out_ring.write(np.full(320, 0.5, np.float32))
    out = np.ones((160, 1), np.float32)
    engine.on_output(out, 160, None, 0)
    assert np.all(out == 0.5)
    engine.on_output(out, 160, None, 0)
    engine.on_output(out, 160, None, 0)  # ring empty: silence, one underrun
    assert np.all(out == 0) and engine.counts["underruns"] == 1


def test_resampling_engine_keeps_the_signal():
    """A device at 48 kHz in and 44.1 kHz out: soxr streams carry their state across blocks."""
    engine = live_audio.LiveEngine(DelayChain(0), out_target_ms=30)
    engine.configure(48000, 44100)
    assert engine.in_resampler is not None and engine.out_resampler is not None
    t = np.arange(48000) / 48000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    indata = np.zeros((480, 1), np.float32)
    got, chunks = np.zeros(44100, np.float32), []
    engine.start_processing()
    try:
        for i in range(0, len(x), 480):
            indata[:, 0] = x[i:i + 480]
            engine.on_input(indata, 480, None, 0)
            deadline = time.monotonic() + 5
            while engine.in_ring.depth() and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(0.001)
            chunks.append(got[:engine.out_ring.read_into(got)].copy())
    finally:
        engine.stop_processing()
    y = np.concatenate(chunks)
    assert engine.counts["overruns"] == engine.counts["realigns"] == 0
    assert len(y) > 40000
    steady = y[4000:40000]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
    peak_hz = np.argmax(spectrum) * 44100 / len(steady)
    assert abs(peak_hz - 440) < 3
    assert 0.28 < np.max(np.abs(steady)) < 0.32
    # No clicks at block joins: a 440 Hz sine changes by at most 2*pi*440/44100*0.3 per sample.
    assert np.max(np.abs(np.diff(steady))) < 0.3 * 2 * np.pi * 440 / 44100 * 1.2


# ---------------------------------------------------------------------------------------------------------------
# Device lookup on PortAudio-shaped device lists (Windows lists each device once per host API)
# ---------------------------------------------------------------------------------------------------------------
HOSTAPIS = [{"name": "MME"}, {"name": "Windows DirectSound"}, {"name": "Windows WASAPI"}]


def _dev(name, api, ins=0, outs=0):
    return {"name": name, "hostapi": api, "max_input_channels": ins, "max_output_channels": outs,
            "default_samplerate": 48000.0}


WINDOWS = [
    _dev("Microsoft Sound Mapper - Input", 0, ins=2),
    _dev("Microphone (USB Audio Device)", 0, ins=1),
    _dev("CABLE Input (VB-Audio Virtual C", 0, outs=2),  # MME cuts names to 31 characters
    _dev("Speakers (Realtek(R) Audio)", 0, outs=2),
    _dev("CABLE Input (VB-Audio Virtual Cable)", 1, outs=2),
    _dev("CABLE Input (VB-Audio Virtual Cable)", 2, outs=2),
    _dev("Microphone (USB Audio Device)", 2, ins=1),
    _dev("CABLE-A Input (VB-Audio Cable A)", 2, outs=2),
]


def test_cable_name_prefers_wasapi_over_mme_and_directsound():
    assert devices.find_device("CABLE Input", "output", WINDOWS, HOSTAPIS) == 5
    assert devices.find_device("usb", "input", WINDOWS, HOSTAPIS) == 6


def test_lookup_by_index_and_default():
    assert devices.find_device(3, "output", WINDOWS, HOSTAPIS) == 3
    assert devices.find_device(None, "input", WINDOWS, HOSTAPIS, default_index=1) == 1
    with pytest.raises(devices.DeviceError, match="not an input device"):
        devices.find_device(3, "input", WINDOWS, HOSTAPIS)
    with pytest.raises(devices.DeviceError, match="does not exist"):
        devices.find_device(42, "input", WINDOWS, HOSTAPIS)


def test_ambiguous_and_missing_names_list_the_candidates():
    with pytest.raises(devices.DeviceError) as err:
        devices.find_device("Input (VB", "output", WINDOWS, HOSTAPIS)
    assert "matches 2 output devices" in str(err.value)
    assert "CABLE-A Input" in err.value.details and "CABLE Input (VB-Audio Virtual Cable)" in err.value.details
    with pytest.raises(devices.DeviceError) as err:
        devices.find_device("BlackHole", "output", WINDOWS, HOSTAPIS, hint="Install BlackHole")
    assert str(err.value) == "no output device matches 'BlackHole'"
    assert "Speakers (Realtek(R) Audio)" in err.value.details and "Install BlackHole" in err.value.details
    assert "Microphone" not in err.value.details, "an output lookup lists output devices only"


def test_device_spec_parsing():
    assert devices.parse_device_spec(None) is None
    assert devices.parse_device_spec("") is None
    assert devices.parse_device_spec("7") == 7
    assert devices.parse_device_spec(" USB ") == "USB"


def test_alsa_definitions_make_server_names_safe():
    text, names = devices._alsa_config_text(
        "pipewire", [("alsa_output.pci-0000_00_1f.3.analog-stereo", 'Built-in "Audio"'), ("default", "x")],
        [("denoised_mic", "Denoised microphone")])
    assert "pcm.alsa_output_pci_0000_00_1f_3_analog_stereo { type asym playback.pcm { type pipewire " \
           "playback_node \"alsa_output.pci-0000_00_1f.3.analog-stereo\" }" in text
    assert "description \"Built-in 'Audio'\"" in text
    assert "pcm.server_default " in text, "a server node must never shadow ALSA's own 'default'"
    assert names["denoised_mic"] == ("denoised_mic", "Denoised microphone")
    assert "capture.pcm { type pipewire capture_node \"denoised_mic\" }" in text


def test_bad_tunable_is_one_line_error(capsys):
    """Each live setting is held to the range its constant documents, at parse time, in one line; settings that
    only clash together are refused by run_live, also in one line."""
    import dsp
    parser = live_audio.add_arguments(dsp.OneLineParser())
    with pytest.raises(SystemExit, match="--out-target-ms: must be in 0..5000, not -5"):
        parser.parse_args(["--out-target-ms", "-5"])
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --out-target-ms: must be in 0..5000, not -5 (--help lists every setting)"]
    args = parser.parse_args(["--buffer-cap-ms", "100", "--out-target-ms", "200"])
    assert live_audio.run_live(DelayChain(), args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --buffer-cap-ms must exceed the cushion plus the realign thresholds"]


def test_warnings_are_rate_limited():
    err = io.StringIO()
    session = live_audio._Session(None, None, io.StringIO(), err, warn_interval_s=60)
    session.warn("underruns", 1, "advice")
    session.warn("underruns", 2, "advice")  # within the interval: held back
    session.warn("realigns", 1, "other advice")  # another kind has its own allowance
    assert err.getvalue().splitlines() == ["warning: 1 underruns so far; advice",
                                           "warning: 1 realigns so far; other advice"]


def test_parse_stats_reads_the_summary_line():
    text = "noise\nstats: seconds=1.50 overruns=2 underruns=0 settled_overruns=1\n"
    assert live_audio.parse_stats(text) == {"seconds": 1.5, "overruns": 2, "underruns": 0, "settled_overruns": 1}
    assert live_audio.parse_stats("nothing") is None


# ---------------------------------------------------------------------------------------------------------------
# Live, through a real sound server
# ---------------------------------------------------------------------------------------------------------------
class LiveProcess:
    """A pipeline (or the stand-in) running live; stdout/stderr collected by threads."""

    def __init__(self, argv, env, cwd=REPO):
        self.proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                        for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line)

    def text(self):
        return "".join(self.out), "".join(self.err)

    def wait_for(self, needle, timeout=60, stream="out"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in (self.out if stream == "out" else self.err)):
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        out, err = self.text()
        raise AssertionError("no %r from the live process (exit %s):\n%s\n%s" % (needle, self.proc.poll(), out, err))

    def stop(self):
        """Ctrl+C, as a user would; returns (exit code, stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for t in self.threads:
            t.join(5)
        return (self.proc.returncode,) + self.text()


def _skip_if_the_server_lost_microphone_audio(stats, out):
    """The engine holds its delay while nothing is lost at the source (issue 25): see skip_if_microphone_lost."""
    skip_if_microphone_lost(stats.get("settled_mic_short_ms"), out)


def _underruns_allowed(stats, one_off=1):
    """How many settled underruns a live run may show: `one_off` for a stall of the whole machine, and one more
    for each time the engine refilled its cushion after microphone audio the sound server never delivered (a
    realign; at most one per block of settled_mic_short_ms). A chain that cannot keep up underruns at every hop,
    dozens of times in 10 s, and does not refill, so this still fails it."""
    short_ms = stats.get("settled_mic_short_ms") or 0.0
    return one_off + min(stats.get("settled_realigns", 0), int(max(0.0, short_ms) // live_audio.BLOCK_MS))


def _live(server, argv, extra_env=None):
    env = dict(server.env, PYTHONUNBUFFERED="1", **(extra_env or {}))
    return LiveProcess([sys.executable, *argv], env)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    """About 10 s of the dev set's noisy speech at 0 dB SNR, as one 16 kHz file (noisy enough that the
    denoised cable is measurably unlike the raw microphone)."""
    import soundfile as sf
    files = sorted(DEV_NOISY.glob("*_snr0.wav"))
    if not files:
        pytest.skip("dev set not found at %s" % DEV_NOISY)
    parts, total = [], 0
    for f in files:
        x, rate = sf.read(f, dtype="float32")
        assert rate == RATE
        parts.append(x)
        total += len(x)
        if total >= 10 * RATE:
            break
    audio = np.concatenate(parts)[:10 * RATE]
    path = tmp_path_factory.mktemp("live") / "speech.wav"
    sf.write(path, audio, RATE)
    return path


def _lag_scores(reference, live, max_lag):
    """The correlation of reference with live at each lag 0..max_lag, divided by the energy of the live stretch it
    covers: raw, a quiet reference window (a pause the model turned down) matches a loud stretch of live at a wrong
    lag better than itself at the true one."""
    from scipy.signal import correlate
    cc = correlate(live, reference, mode="full", method="fft")
    mid = len(reference) - 1
    cc = cc[mid:mid + max_lag]
    energy = np.concatenate([[0.0], np.cumsum(np.square(live, dtype=np.float64))])
    n = len(reference)
    k = np.arange(len(cc))
    norm = np.sqrt(np.maximum(energy[np.minimum(k + n, len(live))] - energy[k], 0.0))
    # A stretch of live near silence (the cable before audio reaches it) scores 0, not rounding noise over ~0.
    return np.where(norm > 0.01 * np.sqrt(np.sum(np.square(reference, dtype=np.float64))), cc / (norm + 1e-30), 0.0)


def _aligned_lag(reference, live, max_lag=RATE):
    """Integer lag of live behind reference (the private graph runs at 16 kHz, so no fractional delay)."""
    return int(np.argmax(_lag_scores(reference, live, max_lag)))


def _fractional_lag(reference, live, max_lag):
    """The lag to a fraction of a sample: a parabola through the peak and its two neighbours."""
    scores = _lag_scores(reference, live, max_lag)
    i = int(np.argmax(scores))
    if 0 < i < len(scores) - 1:
        a, b, c = scores[i - 1], scores[i], scores[i + 1]
        if a - 2 * b + c < 0:
            return i + 0.5 * (a - c) / (a - 2 * b + c)
    return float(i)


def _stretched_part(seg, live, begin, max_lag=RATE):
    """What of live lines up with seg (live's source from sample begin on), and the lag at seg's middle, allowing
    for the servo playing the output up to SERVO_MAX_RATE fast or slow to hold the delay where it was fixed: over
    half a second 1 % is 80 samples, which no single lag lines up. Live is read along a straight line of lags
    through seg's two halves, each found to a fraction of a sample on what the line before read. A stretch smears
    the correlation peaks the line starts from, so it starts from the whole's and each half's, and keeps the best.
    None past live's end."""
    n, h, near = len(seg), len(seg) // 2, 64
    k = np.arange(-near, n + near)

    def read(halves, k):
        where = begin + k + halves[0] + (halves[1] - halves[0]) * (k - h / 2) / h
        first, last = int(np.floor(where[0])), int(np.ceil(where[-1]))
        if first < 0 or last >= len(live):
            return None
        area = live[first:last + 1]
        return np.interp(where - first, np.arange(len(area)), area)

    starts = [_aligned_lag(seg, live[begin:begin + n + max_lag], max_lag)]
    starts += [_aligned_lag(seg[part:part + h], live[begin + part:begin + part + h + max_lag], max_lag)
               for part in (0, h)]
    best = (-2.0, None, float(starts[0]))
    for halves in {(a, b) for a in starts for b in starts}:
        halves = np.array(halves, np.float64)
        if abs(halves[1] - halves[0]) > 2 * live_audio.SERVO_MAX_RATE * h:
            continue
        for _ in range(3):
            got = read(halves, k)
            if got is None:
                break
            moved = halves + [_fractional_lag(seg[part:part + h], got[part:part + h + 2 * near], 2 * near) - near
                              for part in (0, h)]
            if abs(moved[1] - moved[0]) > 2 * live_audio.SERVO_MAX_RATE * h:  # a shift or a pause, not a stretch
                break
            halves = moved
        got = read(halves, k[near:-near])
        if got is not None and np.std(got) > 0:
            corr = np.corrcoef(seg, got)[0, 1] if np.std(seg) > 0 else 0.0
            if corr > best[0]:
                best = (corr, got, float(np.mean(halves)))
    return best[1], best[2]


def _stretched_match(seg, live, begin, max_lag=RATE):
    """_stretched_part's correlation with seg (0 where either is silent: the cable's start and end) and lag."""
    got, lag = _stretched_part(seg, live, begin, max_lag)
    if got is None or np.std(got) == 0 or np.std(seg) == 0:
        return 0.0, lag
    return float(np.corrcoef(seg, got)[0, 1]), lag


def _active_span(x, threshold=1e-4):
    idx = np.flatnonzero(np.abs(x) > threshold)
    assert len(idx), "nothing reached the recording"
    return idx[0], idx[-1] + 1


@pytest.mark.parametrize("script, flags", [("ml_denoiser_pipeline.py", []),
                                           ("ml_denoiser_pipeline.py", ["--low-latency"]),
                                           ("dsp_filter_pipeline.py", [])],
                         ids=["ml", "ml-low-latency", "dsp"])
def test_live_pipeline_matches_file_mode(script, flags, sound_server, fake_mic, cable, probe, speech_wav, tmp_path):
    """Noisy speech through the live pipeline: for 5 s once the delay is fixed, the same audio as file mode, the
    latency the pipeline printed, and no over/underruns."""
    import importlib
    import soundfile as sf
    module = importlib.import_module(script[:-3])
    speech, rate = sf.read(speech_wav, dtype="float32")
    long_wav = tmp_path / "long.wav"  # still playing when the pipeline stops: a player's end reconfigures the graph
    sf.write(long_wav, np.tile(speech, 2), rate)
    low_latency = "--low-latency" in flags
    # The shipped denoiser.onnx: a random-weight model masks almost uniformly, and then the cable would
    # correlate with the raw microphone as well as with file mode, and prove nothing.
    # Status lines twice a second, so that a failure shows when the buffers ran low and what the delay did.
    live = _live(sound_server, [REPO / script, *flags, "--mic", FAKE_MIC, "--status-interval-s", "0.5",
                                "--no-idle"])  # the probe is no app
    live.wait_for(live_audio.READY_LINE)
    player = sound_server.play(str(long_wav), FAKE_MIC_SINK)
    played_at = time.monotonic()
    live.wait_for(live_audio.FIXED_LINE, timeout=15)  # settling ends 5 s after the devices start
    fixed_after_s = time.monotonic() - played_at  # late by paplay's start-up, so the window starts late, never early
    time.sleep(6.0)  # 3 s to compare even when paplay takes a second to start on a slow machine
    code, out, err = live.stop()
    assert player.poll() is None, "the speech ended before the pipeline was stopped"
    player.terminate()
    player.wait(10)
    recording = SoundServer.stop_recording(probe)
    assert code == 0, err
    assert "Traceback" not in err

    stats = live_audio.parse_stats(out)
    assert stats is not None, out
    _skip_if_the_server_lost_microphone_audio(stats, out)
    # One underrun is allowed: the cushion covers the chain's repeated slow calls, not a one-off stall of the
    # whole machine (a loaded 2-core CI box stalled the process for >54 ms once in ~10 runs); and one for each
    # refill after microphone audio the server lost (_underruns_allowed).
    assert stats["settled_overruns"] == 0 and stats["settled_underruns"] <= _underruns_allowed(stats), out
    # A PortAudio xrun with no underrun of ours is the same one-off stall seen from the device side (the
    # callback itself ran late), so it gets the same single allowance, once for each stream: one stall of the
    # whole machine flags both the microphone's and the cable's.
    assert stats["settled_device_xruns"] <= 2 * max(stats["settled_underruns"], 1), "PortAudio xruns: " + out
    assert stats["device_losses"] == 0

    mic, cabled = recording[:, 0], recording[:, 1]
    reference = module.denoise_array(mic, low_latency=True) if low_latency else module.denoise_array(mic)
    algorithm_ms = module.latency_ms(module.default_config(low_latency=True)) if low_latency else module.latency_ms()
    # Settling refills (a sound server's rate matching drains the ring in the first seconds) move the delay on
    # purpose: compare what the microphone played after the delay was fixed, up to what reached the cable before
    # the stop (the delay is under half a second).
    start = _active_span(mic)[0] + int((fixed_after_s + 0.25) * RATE)
    stop = _active_span(cabled)[1] - 3 * RATE // 4
    assert stop - start >= 3 * RATE, "%.1f s compared:\n%s" % ((stop - start) / RATE, out)
    corr, lags, raw, each = _piecewise_match(reference[start:stop], cabled[start:], mic[start:stop])
    latency_ms = 1000.0 * float(np.median(lags)) / RATE
    # What the pipeline said at start ("latency: ... ms total"): its algorithm, its cushion and the devices'
    # buffers as PortAudio reports them, which the probe's own path through the server measures a little under.
    said_ms = float(re.search(r"latency: ([\d.]+) ms total", out).group(1))
    fixed_line = next(line for line in out.splitlines() if line.startswith(live_audio.FIXED_LINE))
    print("%s %s live: median correlation %.4f (with the raw microphone %.4f), latency %.1f ms (said %.1f, "
          "algorithm %.1f ms), %d lag change(s), %s, %s"
          % (script, " ".join(flags), corr, raw, latency_ms, said_ms, algorithm_ms,
             np.count_nonzero(np.abs(np.diff(lags)) >= 1), fixed_line, out.strip().splitlines()[-1]))
    report = "windows %s\nlags %s\n%s" % (np.round(each, 3).tolist(), np.round(lags, 1).tolist(), out)
    assert corr >= 0.95, report
    assert corr > raw + 0.01, "the cable must carry the processed signal, not the microphone passed through"
    assert algorithm_ms <= said_ms and -60 <= latency_ms - said_ms <= 25, (latency_ms, said_ms, algorithm_ms)
    if low_latency:
        assert latency_ms <= 80, "the low-latency chain promises at most 80 ms from microphone to cable"


def _piecewise_match(reference, live, raw, window=RATE // 16, min_windows=32):
    """The median over short windows, each aligned on its own, of live's correlation with reference and with the
    raw microphone, and each window's lag. A loaded test machine can make the sound server drop a few samples
    unannounced, or shift a stream by 4 ms and back a few hundred ms later, several times a second under a CPU
    quota (docs/EXPERIMENTS.md): the window a shift falls in no single line of lags can match, so windows are
    short, while a wrong path (the raw microphone, other audio) fails them all."""
    each, each_raw, lags = [], [], []
    for begin in range(0, len(reference) - window + 1, window):
        seg = reference[begin:begin + window]
        if np.sqrt(np.mean(seg ** 2)) < 1e-4:  # near-silent: its alignment would be noise
            continue
        got, lag = _stretched_part(seg, live, begin)
        if got is None:
            break
        lags.append(lag)
        each.append(np.corrcoef(seg, got)[0, 1])
        each_raw.append(np.corrcoef(raw[begin:begin + window], got)[0, 1])
    assert len(lags) >= min_windows, "too little audio reached the cable"
    return float(np.median(each)), np.array(lags), float(np.median(each_raw)), np.array(each)


def test_piecewise_match_follows_the_servos_speed_change(speech_wav):
    """The live tests' yardstick: speech played up to SERVO_MAX_RATE fast or slow and delayed by a fraction of a
    sample still matches itself window by window, at the lag it has in each window's middle; other speech does not."""
    import soundfile as sf
    speech = sf.read(speech_wav, dtype="float32")[0][:4 * RATE]
    for rate in (0.0, 0.004, -live_audio.SERVO_MAX_RATE):
        t = np.arange(len(speech) + RATE) / (1 + rate) - 3000.6  # sample i of speech plays at (i + 3000.6)(1 + rate)
        live = np.interp(t, np.arange(len(speech)), speech, left=0, right=0).astype(np.float32)
        corr, lags, other, _ = _piecewise_match(speech[:3 * RATE], live, speech[RATE:4 * RATE])
        middle = np.arange(RATE // 32, 3 * RATE, RATE // 16)[:len(lags)]
        assert corr > 0.98 and other < 0.5, (rate, corr, other)
        assert np.median(np.abs(lags - (3000.6 * (1 + rate) + middle * rate))) < 0.5, rate


def _short_window_match(reference, live, window=RATE // 25, max_lag=RATE):
    """Each 40 ms of reference found in live on its own: its correlation with what of live lines up with it,
    allowing for the servo's speed change (_stretched_match), and the lag, per window (near-silent windows left
    out). The private sound server now and then shifts a stream by 4-12 ms, or garbles a few tens of ms, with no
    counter of ours moving (docs/EXPERIMENTS.md); on short windows such an event costs the few it touches, while
    a wrong path (other audio, a wrong rate) fails nearly all."""
    each, lags = [], []
    live = np.asarray(live, np.float64)
    for begin in range(0, len(reference) - window + 1, window):
        seg = reference[begin:begin + window].astype(np.float64)
        if np.sqrt(np.mean(seg ** 2)) < 1e-4:
            continue
        if len(live) - begin < window:
            break
        corr, lag = _stretched_match(seg, live, begin, max_lag)
        each.append(corr)
        lags.append(lag)
    return np.array(each), np.array(lags)


def _assert_matches_where_steady(each, lags, out, threshold):
    """The cable carries the reference wherever the lag holds still: of the windows whose lag agrees (to 2
    samples) with both neighbours', 90 % match above threshold, and they are at least 30 % of all. A window
    beside a change of the lag may not match: on a stalling machine the private server drops a stream's audio 4 ms
    at a time, a dozen times in 2.5 s (docs/EXPERIMENTS.md), and the engine refills after such losses. Other audio
    or a wrong rate gives lags that never agree from one window to the next, and fails. Returns the steady
    windows' share of all and the share of them that match."""
    held = np.abs(np.diff(lags)) <= 2
    steady = np.r_[True, held] & np.r_[held, True]
    report = "steady %d of %d windows\n%s" % (steady.sum(), len(steady), _match_report(each, lags, out))
    matched = float(np.mean(each[steady] > threshold)) if steady.any() else 0.0
    assert steady.mean() >= 0.3 and matched >= 0.9, report
    return float(steady.mean()), matched


def _match_report(each, lags, out):
    """What a failed window-by-window match shows: each window's correlation and lag, and the pipeline's lines
    (status lines say whether the servo was moving the delay, "returning to")."""
    return "windows %s\nlags (samples) %s\n%s" % (np.round(each, 3).tolist(), np.round(lags, 1).tolist(), out)


def test_recovers_when_the_microphone_vanishes_and_returns(sound_server, fake_mic, cable, probe, tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    rng = np.random.default_rng(4)
    import soundfile as sf
    noise = tmp_path / "noise.wav"
    sf.write(noise, (0.1 * rng.standard_normal(20 * RATE)).astype(np.float32), RATE)
    # --no-servo: after a shift in the sound server's buffering the servo plays up to 1 % faster or slower for
    # seconds, on purpose, and no window would then match sample for sample (its own tests are offline, above).
    live = _live(sound_server, [script, "--mic", FAKE_MIC, "--status-interval-s", "0.5", "--retry-interval-s", "0.5",
                                "--no-idle", "--no-servo"])
    live.wait_for(live_audio.READY_LINE)
    player = sound_server.play(str(noise), FAKE_MIC_SINK)
    time.sleep(1.0)
    fake_mic.remove_source()
    live.wait_for("the microphone stopped", timeout=10, stream="err")
    time.sleep(1.0)
    fake_mic.add_source()
    live.wait_for("resumed", timeout=10)
    live.wait_for(live_audio.FIXED_LINE, timeout=15)  # reopened devices settle again: refills there shift the cable
    time.sleep(3.0)
    code, out, err = live.stop()
    player.terminate()
    player.wait(10)
    recording = SoundServer.stop_recording(probe)
    assert code == 0, err
    stats = live_audio.parse_stats(out)
    assert stats["device_losses"] == 1, out
    _skip_if_the_server_lost_microphone_audio(stats, out)  # counted from when the reopened devices' delay was fixed
    # In the last 2.5 s before the stop (after the re-opened devices' delay was fixed), the cable carries the
    # microphone again, delayed and unchanged, except where the sound server garbled a few windows (see
    # _short_window_match). White noise from anything else would correlate near 0.
    mic, cabled = recording[:, 0], recording[:, 1]
    _, stop = _active_span(cabled)
    start, stop = stop - 5 * RATE // 2, stop - RATE // 2
    each, lags = _short_window_match(mic[start:stop], cabled[start:])
    assert len(each) >= 40, "too little audio reached the cable"
    _assert_matches_where_steady(each, lags, out, 0.99)


def test_device_that_refuses_16k_is_opened_at_its_rate_and_resampled(sound_server, fake_mic, cable, probe,
                                                                      tmp_path, speech_wav):
    """An ALSA pcm pinned to 48 kHz (input) and 44.1 kHz (output), like hardware without a rate converter."""
    conf = tmp_path / "pinned.conf"
    conf.write_text('pcm.mic48k { type asym capture.pcm { type pipewire capture_node "%s" rate 48000 } }\n'
                    'pcm.cable44k { type asym playback.pcm { type pipewire playback_node "denoiser_cable" '
                    'rate 44100 } }\n' % FAKE_MIC)
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    live = _live(sound_server, [script, "--mic", "mic48k", "--cable", "cable44k", "--status-interval-s", "0.5",
                                "--no-idle", "--no-servo"],  # as in the recovery test: no deliberate speed change
                 {"ALSA_CONFIG_PATH": "/usr/share/alsa/alsa.conf:%s" % conf})
    live.wait_for(live_audio.READY_LINE)
    out_so_far = "".join(live.out)
    assert "48000 Hz" in out_so_far and "44100 Hz" in out_so_far, out_so_far
    player = sound_server.play(str(speech_wav), FAKE_MIC_SINK)
    live.wait_for(live_audio.FIXED_LINE, timeout=15)  # settled_* count from here: refills before it find the jitter
    time.sleep(3.0)
    player.terminate()
    player.wait(5)
    code, out, err = live.stop()
    recording = SoundServer.stop_recording(probe)
    assert code == 0, err
    stats = live_audio.parse_stats(out)
    _skip_if_the_server_lost_microphone_audio(stats, out)
    assert stats["settled_overruns"] == 0 and stats["settled_underruns"] <= _underruns_allowed(stats, 0), out
    status = [line for line in out.splitlines() if line.startswith("denoising in ")]
    assert len(status) >= 6, "a status line about twice a second:\n" + out
    assert re.match(r"denoising in +-?\d+\.\d out +-?\d+\.\d dBFS gate 100% hop 0\.1/10ms buf \d+\+\d+ms "
                    r"delay \d+ms( \(returning to \d+\))? over \d+ under \d+ realign \d+$", status[-1]), status[-1]
    # Two resamplers (PipeWire's and soxr's) blur the top octave: compare below 6 kHz.
    from scipy.signal import butter, sosfiltfilt
    sos = butter(8, 6000, fs=RATE, output="sos")
    mic, cabled = sosfiltfilt(sos, recording[:, 0]), sosfiltfilt(sos, recording[:, 1])
    # The last 2.5 s the microphone played lie after the delay was fixed (the player stopped 3 s after it); before
    # it, settling refills move the delay on purpose. The final quarter second may not have reached the cable.
    _, stop = _active_span(recording[:, 0])
    start, stop = stop - 5 * RATE // 2, stop - RATE // 4
    each, lags = _short_window_match(mic[start:stop], cabled[start:])
    assert len(each) >= 40, "too little audio reached the cable"
    steady, matched = _assert_matches_where_steady(each, lags, out, 0.95)
    print("resampled live path: %.0f %% of 40 ms windows steady, %.0f %% of those match (%.0f %% of all), latency "
          "%.1f ms" % (100 * steady, 100 * matched, 100 * np.mean(each > 0.95), 1000.0 * np.median(lags) / RATE))


def _run_standin(server, tmp_path, *argv):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    env = dict(server.env)
    return subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                          timeout=60)


def test_ambiguous_or_missing_microphone_is_a_listed_error(sound_server, fake_mic, cable, tmp_path):
    proc = _run_standin(sound_server, tmp_path, "--mic", "mic")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: 'mic' matches ") and "input devices" in lines[0], proc.stderr
    assert any("fake_mic (Fake microphone)" in line for line in lines)
    assert any("denoised_mic (Denoised microphone)" in line for line in lines)
    assert "Traceback" not in proc.stderr

    proc = _run_standin(sound_server, tmp_path, "--mic", "no such mic")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == "error: no input device matches 'no such mic'"
    assert "fake_mic" in proc.stderr


def test_missing_cable_says_how_to_create_it(sound_server, fake_mic, tmp_path):
    proc = _run_standin(sound_server, tmp_path, "--mic", FAKE_MIC)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == "error: no output device matches 'denoiser_cable'", proc.stderr
    assert "start_pipeline.sh" in proc.stderr and "module-null-sink sink_name=denoiser_cable" in proc.stderr
    assert "fake_mic_sink" in proc.stderr, "the listing shows the outputs there are"


def test_refuses_to_listen_to_its_own_output(sound_server, fake_mic, cable, tmp_path):
    proc = _run_standin(sound_server, tmp_path, "--mic", "denoised_mic")
    assert proc.returncode == 1
    assert "this pipeline's own output" in proc.stderr.splitlines()[0]


def test_lookup_by_index_and_name_on_real_devices(sound_server, fake_mic, cable, tmp_path):
    listing = subprocess.run([sys.executable, str(REPO / "list_devices.py")], env=sound_server.env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    index = next(int(line.split()[0].rstrip("<>")) for line in listing.stdout.splitlines()
                 if line.rstrip().endswith("fake_mic (Fake microphone)"))
    proc = _run_standin(sound_server, tmp_path, "--list", "--mic", str(index), "--cable", "Denoiser cable")
    assert proc.returncode == 0, proc.stderr
    assert "microphone: %d fake_mic (Fake microphone)" % index in proc.stdout
    assert "cable: " in proc.stdout and "denoiser_cable (Denoiser cable)" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Idle while no app listens, A/B bypass at the same delay
# ---------------------------------------------------------------------------------------------------------------
def _cpu_s(pid):
    """User + system CPU seconds of a process, all its threads."""
    import os
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_s(pid, seconds=4.0):
    start = _cpu_s(pid)
    time.sleep(seconds)
    return (_cpu_s(pid) - start) / seconds


def _steady_voice(path, seconds):
    """A continuous voiced sound (harmonics of a gliding pitch, no pauses): any stretch of the cable is audio."""
    import soundfile as sf
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(150 + 20 * np.sin(2 * np.pi * 0.5 * t)) / RATE
    sf.write(path, (0.08 * sum(np.sin(k * phase) / k for k in range(1, 16))).astype(np.float32), RATE)


def _wait_for_line(live, needle, after=0, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in "".join(live.out)[after:]:
            return
        time.sleep(0.01)
    raise AssertionError("no %r:\n%s" % (needle, "".join(live.out)))


@pytest.mark.parametrize("script", ["ml_denoiser_pipeline.py", "dsp_filter_pipeline.py"])
def test_idle_while_no_app_records_and_back_within_200_ms(script, sound_server, fake_mic, cable, tmp_path):
    """No recorder on the virtual microphone: the devices close and CPU falls under a tenth of what one recorder
    costs; when a recorder attaches, its recording carries audio within 200 ms plus the pipeline's latency."""
    source = tmp_path / "voice.wav"
    _steady_voice(source, 40.0)
    live = _live(sound_server, [REPO / script, "--mic", FAKE_MIC, "--status-interval-s", "0.5"])
    live.wait_for(live_audio.READY_LINE)
    player = sound_server.play(str(source), FAKE_MIC_SINK)
    try:
        _wait_for_line(live, "idle: no app is recording from the cable")
        latency_ms = float(re.search(r"latency: ([\d.]+) ms total", "".join(live.out)).group(1))
        idle_cpu = _cpu_per_s(live.proc.pid)
        assert "idle (no app listening)" in "".join(live.out)
        mark = len("".join(live.out))
        recorder = sound_server.record("denoised_mic", str(tmp_path / "app.raw"))
        _wait_for_line(live, "an app is recording from the cable: denoising", after=mark)
        time.sleep(1.0)  # past the first second, where the devices reopen
        active_cpu = _cpu_per_s(live.proc.pid)
        recording = SoundServer.stop_recording(recorder)
        _wait_for_line(live, "idle: no app is recording", after=mark)
    finally:
        player.terminate()
        player.wait(5)
        code, out, err = live.stop()
    assert code == 0, err
    first = np.flatnonzero(np.abs(recording[:, 0]) > 1e-3)
    assert len(first), "the recorder got nothing"
    back_ms = 1000.0 * first[0] / RATE - latency_ms
    print("%s: CPU idle %.4f s/s, active %.4f s/s; audio %.0f ms after the recorder attached (latency %.0f ms)"
          % (script, idle_cpu, active_cpu, 1000.0 * first[0] / RATE, latency_ms))
    assert idle_cpu < active_cpu / 10, (idle_cpu, active_cpu)
    assert back_ms <= 200, back_ms


def test_bypass_is_the_raw_microphone_at_the_same_delay(sound_server, fake_mic, cable, probe, speech_wav, tmp_path):
    """SIGUSR1 four times, 3 s apart, over noisy speech once the delay is fixed: the cable alternates between file
    mode's output and the raw microphone at the same level, and across each switch the lag stays where it was
    (to the sample: test_bypass_delay_is_each_chains_own below)."""
    import soundfile as sf
    import ml_denoiser_pipeline as module
    speech, rate = sf.read(speech_wav, dtype="float32")
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.tile(speech, 3), rate)
    live = _live(sound_server, [REPO / "ml_denoiser_pipeline.py", "--mic", FAKE_MIC, "--status-interval-s", "0.5",
                                "--no-idle"])
    live.wait_for(live_audio.READY_LINE)
    player = sound_server.play(str(long_wav), FAKE_MIC_SINK)
    played_at = time.monotonic()
    # Settling refills move the delay on purpose; the switches must not land there.
    live.wait_for(live_audio.FIXED_LINE, timeout=15)
    fixed_after_s = time.monotonic() - played_at
    for _ in range(4):
        time.sleep(3.0)
        live.proc.send_signal(signal.SIGUSR1)
    assert player.wait(60) == 0, player.stderr.read()
    time.sleep(0.5)
    code, out, err = live.stop()
    recording = SoundServer.stop_recording(probe)
    assert code == 0, err
    assert out.count("bypass on: the raw microphone") == 2 and out.count("bypass off: denoising") == 2, out
    _skip_if_the_server_lost_microphone_audio(live_audio.parse_stats(out), out)
    mic, cabled = recording[:, 0], recording[:, 1]
    start, stop = _active_span(mic)
    reference = module.denoise_array(mic)
    # Quarter-second windows, each aligned on its own against both candidates: the private PipeWire sometimes
    # moves a stream's rate by 1-2 % for a second or so (docs/EXPERIMENTS.md), and the servo moves it back.
    window = RATE // 4
    states, lags, levels, scores = [], [], [], []
    for begin in range(start + int((fixed_after_s + 0.25) * RATE), stop - window - RATE, window):
        seg = mic[begin:begin + window]
        (c_den, lag_den), (c_raw, lag_raw) = (_stretched_match(reference[begin:begin + window], cabled, begin),
                                              _stretched_match(seg, cabled, begin))
        scores.append((round(c_den, 3), round(c_raw, 3)))
        # Which of the two the window is, by a clear margin: a loaded machine garbles the odd window for both
        # (the sound server's own xruns), and then neither is near 1.
        if c_raw > 0.9 and c_raw > c_den + 0.1:
            got = cabled[begin + int(lag_raw):begin + int(lag_raw) + window]
            states.append("B"), lags.append(lag_raw), levels.append(20 * np.log10(np.std(got) / np.std(seg)))
        elif c_den > 0.85 and c_den > c_raw + 0.1:
            states.append("D"), lags.append(lag_den), levels.append(None)
        else:  # straddles a switch, a dropped block or a shift of the sound server's
            states.append("-"), lags.append(None), levels.append(None)
    kept = [i for i, s in enumerate(states) if s != "-"]
    runs = [states[i] for j, i in enumerate(kept) if j == 0 or states[kept[j - 1]] != states[i]]
    switches = [(kept[j - 1], i) for j, i in enumerate(kept) if j and states[kept[j - 1]] != states[i]]
    steps = [round(float(lags[i] - lags[h]), 1) for h, i in switches]
    bypassed_db = [v for v in levels if v is not None]
    report = "%s\n(denoised, raw) correlation per window %s\n%s" % ("".join(states), scores, out)
    print("%s\nlag steps across the switches %s; bypassed level %+.2f dB" % (report, steps, np.median(bypassed_db)))
    assert runs == ["D", "B", "D", "B", "D"], report
    # Within 10 ms at three of the four: what the servo (at most 1 %) and the server's own shifts (4-12 ms, now
    # and then, uncounted) can move between two windows a quarter second either side of a switch; a bypass at
    # the wrong delay is off by the chain's hop or window (100-200 ms) at every switch.
    assert sum(abs(d) <= RATE // 100 for d in steps) >= 3, (steps, report)
    assert abs(np.median(bypassed_db)) < 0.5, bypassed_db


@pytest.mark.parametrize("script, flags", [("ml_denoiser_pipeline.py", []),
                                           ("ml_denoiser_pipeline.py", ["--low-latency"]),
                                           ("dsp_filter_pipeline.py", [])], ids=["ml", "ml-low-latency", "dsp"])
def test_bypass_delay_is_each_chains_own(script, flags):
    """The engine's bypass holds the raw input back by the chain's latency_samples, which is the chain's true
    delay: through a real chain and the engine's own Bypass, toggled half-way, the output is file mode's result
    and then the input, both exactly latency_samples late."""
    import importlib
    module = importlib.import_module(script[:-3])
    args = module.parse_args(flags) if hasattr(module, "parse_args") else module.build_parser().parse_args(flags)
    make = getattr(module, "make_chain", getattr(module, "DSPChain", None))
    engine = live_audio.LiveEngine(make(args))
    delay = engine.chain.latency_samples
    x = 0.05 * np.random.default_rng(3).standard_normal(4 * RATE).astype(np.float32)
    x[RATE:] += 0.2 * np.sin(2 * np.pi * 220 * np.arange(3 * RATE) / RATE).astype(np.float32)
    expected = dsp_process_offline(make(args), x)
    out, half, block = [], 2 * RATE, 160
    for i in range(0, len(x), block):
        if i == half:
            engine.bypass.toggle()
        part = x[i:i + block]
        out.append(engine.bypass.process(part, np.asarray(engine.chain.process(part), np.float32)))
    out = np.concatenate(out)
    fade = int(live_audio.BYPASS_FADE_MS * RATE / 1000)
    assert np.allclose(out[delay:half], expected[:half - delay], atol=1e-5)
    assert np.array_equal(out[half + fade:], x[half + fade - delay:len(x) - delay])


@pytest.mark.parametrize("script, flags", [("ml_denoiser_pipeline.py", []),
                                           ("ml_denoiser_pipeline.py", ["--low-latency"]),
                                           ("dsp_filter_pipeline.py", [])], ids=["ml", "ml-low-latency", "dsp"])
def test_going_idle_flushes_the_chain(script, flags, speech_wav):
    """What was in the chain when the last app stopped listening never reaches the next one: going idle runs the
    chain on silence there and then (so waking up costs no model calls), and after it a silent microphone gives
    silence from the first sample on."""
    import importlib
    module = importlib.import_module(script[:-3])
    args = module.parse_args(flags) if hasattr(module, "parse_args") else module.build_parser().parse_args(flags)
    make = getattr(module, "make_chain", getattr(module, "DSPChain", None))
    engine = live_audio.LiveEngine(make(args))
    chain = engine.chain
    import soundfile as sf
    speech = sf.read(speech_wav, dtype="float32")[0][:2 * RATE]
    level = np.abs(chain.process(speech)).max()
    session = live_audio._Session(None, None, io.StringIO(), io.StringIO())
    assert live_audio._set_idle(engine, session, True, None, None) is True
    after = chain.process(np.zeros(chain.latency_samples + RATE // 10, np.float32))
    assert level > 0.01 and np.abs(after).max() < 1e-4 * level, (level, np.abs(after).max())


def test_bypass_switch_delays_the_raw_input_by_the_chain_latency_and_crossfades():
    b = live_audio.Bypass(300, fade_ms=5.0)
    x = np.random.default_rng(0).standard_normal(2000).astype(np.float32)
    y = np.zeros(2000, np.float32)
    assert np.array_equal(b.process(x[:1000], y[:1000]), y[:1000])  # off: the chain's output
    b.toggle()
    out = np.concatenate([b.process(x[1000:1500], y[1000:1500]), b.process(x[1500:], y[1500:])])
    fade = int(0.005 * 16000)
    assert np.allclose(out[fade:], x[1000 - 300 + fade:2000 - 300])  # on: the input, 300 samples late
    weights = out[:fade] / x[700:700 + fade]
    assert np.all(np.diff(weights) > 0) and 0 < weights[0] < weights[-1] <= 1  # a ramp, not a step


def test_recorders_counts_apps_on_the_cable_and_not_the_remap_itself():
    sources = "45\tdenoiser_cable.monitor\tPipeWire\tfloat32le 1ch 16000Hz\tIDLE\n" \
              "50\tdenoised_mic\tPipeWire\tfloat32le 1ch 16000Hz\tIDLE\n" \
              "52\tfake_mic\tPipeWire\tfloat32le 1ch 16000Hz\tRUNNING\n"
    remap = "51\t45\t-\tPipeWire\tfloat32le 1ch 16000Hz\n"
    ours = "70\t52\t61\tPipeWire\tfloat32le 1ch 16000Hz\n"  # the pipeline recording the real microphone
    assert devices.recorders("denoiser_cable", sources, remap + ours) == 0
    assert devices.recorders("denoiser_cable", sources, remap + ours + "60\t50\t59\tPipeWire\tfloat32le\n") == 1
    assert devices.recorders("denoiser_cable", sources, remap + "61\t45\t63\tPipeWire\tfloat32le\n") == 1
