"""Live streaming shared by both pipelines: microphone -> denoising chain -> virtual cable, on Windows, macOS, Linux.

Not run by itself: `python ml_denoiser_pipeline.py` and `python dsp_filter_pipeline.py` (no --input) use it,
and `python list_devices.py` lists the devices it can use. The pipelines add its flags with add_arguments()
(--mic, --cable, --quiet, --list and the tunables below) and hand over with run_live(chain, args).

How audio flows: the sounddevice input callback copies each block into a bounded ring buffer; a processing
thread runs the chain (resampling first when a device refuses 16 kHz); a second bounded ring buffer feeds the
output callback. Callbacks only copy samples. The delay is set once: before the devices start, the chain runs on
a second of silence (warm_up), and the output cushion is sized to cover its slowest call with a margin; in the first
SETTLE_DELAY_S of audio, running dry refills the cushion (the delay grows by what the devices' own jitter needs).
After that it never moves: when the chain is late and the output runs dry, the output fades out, plays silence (an
"underrun", counted) and, when audio returns, skips what the silence stood in for and fades back in; when a
buffer backs up beyond its limit the oldest audio is dropped (a "realign", counted). Audio the sound server lost
before it reached us never returns: the silence then lasts until the cushion is full again (a realign too).

The delay is also measured, on PortAudio's clock: each input block carries the ADC time of its first sample, each
output block the time it will reach the cable, and the positions of the two ring buffers say which input sample
each output sample came from. The sound server's own buffering moves under load (an xrun in its bridge leaves
it a block or two deeper), which no counter of ours sees; the servo (SERVO) undoes it by reading the output a
little faster or slower, by linear interpolation, until the measured delay is back where settling fixed it.

Idle (IDLE, Linux): while no application records from the cable (its monitor, or "Denoised microphone"), the
devices are closed and the model is not run; the cable then carries silence, the microphone is free and the process
sleeps. `pactl subscribe` says the moment an app opens it, and the devices reopen. Bypass (A/B): Enter in the
terminal, or SIGUSR1 where none is attached (`./start_pipeline.sh ab`), switches the output to the raw microphone
at the same delay and level, crossfaded over BYPASS_FADE_MS; the chain keeps running, so switching back is instant.

Devices (lookup, listing, the Linux sound server's virtual devices) are devices.py's.

Edit the constants below to tune; the flags of the same name override them.
"""
import math
import signal
import sys
import threading
import time

import numpy as np

from devices import (DeviceError, ListenerWatch, channels_key, check_not_own_output, device_identity,
                     extra_settings, find_again, parse_device_spec, print_devices, rescan_devices, resolve,
                     settings_ok, sounddevice_module)
from dsp import SAMPLE_RATE  # the chains' rate; devices that refuse it are resampled to and from it

# ---- tunables: each a flag of both pipelines (--block-ms ...); [low, high] is the range each may take ---------
BLOCK_MS = 10              # [1, 200] device callback period, ms: smaller lowers latency but wakes the CPU more often
DEVICE_LATENCY = "low"     # PortAudio's suggested device latency: "low", "high" or seconds; "high" if audio crackles
OUT_TARGET_MS = 40         # [0, 5000] output cushion for device and scheduling jitter, ms, on top of the chain's
                           # measured slow call; raise it if the status line counts dropouts (crackle)
CUSHION_MARGIN = 1.5       # [1, 10] cushion = the chain's slowest warm-up call times this; up = safer, more delay
OUT_TARGET_MAX_MS = 250    # [50, 5000] the cushion never exceeds this, ms, whatever the warm-up measured
WARMUP_S = 1.0             # [0, 10] seconds of silence run through the chain before the devices start, to time it
FADE_MS = 2.0              # [0.1, 20] a dropout fades out and back in over this, ms; the output holds this much back
SETTLE_DELAY_S = 5.0       # [0, 60] for this long after the audio starts, running dry grows the delay by what was
                           # missing (the devices' own jitter is found); after it the delay is fixed
REANCHOR_MS = 250          # [20, 10000] a dropout still owed after this, with no backlog to catch up on, is audio
                           # lost at the source: the cushion refills and the delay returns (a realign)
OUT_REALIGN_MS = 80        # [1, 5000] output backlog above the cushion that triggers a realign, ms; lower = tighter
IN_REALIGN_MS = 150        # [1, 5000] input backlog (processing fell behind) that triggers a realign, ms
BUFFER_CAP_MS = 1000       # [50, 60000] hard size of each ring buffer, ms; audio beyond it is dropped as an overrun
STATUS_INTERVAL_S = 0.5    # [0.05, 60] status line refresh period, s
WARN_INTERVAL_S = 5.0      # [0, 3600] at most one warning of each kind per this many seconds
RETRY_INTERVAL_S = 1.0     # [0.05, 60] how often a lost device is looked for again, s
DEVICE_STALL_S = 1.5       # [0.1, 60] a device whose callbacks stop this long, s, is treated as lost (sleep, unplug)
RESAMPLE_QUALITY = "LQ"    # soxr quality when a device refuses 16 kHz: QQ, LQ (least delay), MQ, HQ, VHQ (more delay)
SETTLE_S = 0.5             # settled_* never count the first this many seconds (a chain's startup_ms wins; --settle-s)
IDLE = True                # Linux: close the devices and skip the model while no app records from the cable
IDLE_FLUSH_S = 0.1         # silence run through the chain on going idle (its latency and frame, if longer), s
BYPASS = False             # start in bypass: the raw microphone at the same delay and level (Enter/SIGUSR1 toggle)
BYPASS_FADE_MS = 10.0      # [0.5, 500] crossfade between denoised and raw audio on a toggle; shorter = may click
DELAY_WINDOW = 100         # [10, 10000] the delay shown is the median of this many output blocks (1 s of 10 ms blocks)
DELAY_START_S = 2.0        # [0, 600] the stats line's delay_start_ms is taken this long after the delay was fixed
MAX_PLAUSIBLE_DELAY_MS = 5000.0  # a meter reading outside 0..this is a host API's bad timestamps, not a delay
SERVO = True               # hold the measured mic-to-cable delay where it was fixed, by playing the output a little
                           # faster or slower (the devices' buffering moves under load; this undoes it)
SERVO_DEADBAND_MS = 1.0    # [0.1, 100] the servo starts when the delay is this far from where it was fixed, ms
SERVO_TIME_S = 2.0         # [0.2, 60] it closes the gap with this time constant, s; shorter = faster, more audible
SERVO_MAX_RATE = 0.01      # [0.0001, 0.05] fastest speed change while it does (0.01 = 1 %, a sixth of a semitone)
GIL_SWITCH_MS = 0.5        # [0.05, 5] longest a Python thread keeps the interpreter from the audio callbacks, ms
# ------------------------------------------------------------------------------------------------------------
LIVE_FLAGS = ["BLOCK_MS", "DEVICE_LATENCY", "OUT_TARGET_MS", "CUSHION_MARGIN", "OUT_TARGET_MAX_MS", "WARMUP_S",
              "FADE_MS", "SETTLE_DELAY_S", "REANCHOR_MS", "OUT_REALIGN_MS", "IN_REALIGN_MS", "BUFFER_CAP_MS",
              "STATUS_INTERVAL_S", "WARN_INTERVAL_S", "RETRY_INTERVAL_S", "DEVICE_STALL_S", "RESAMPLE_QUALITY",
              "IDLE", "BYPASS", "BYPASS_FADE_MS", "DELAY_WINDOW", "DELAY_START_S", "SERVO", "SERVO_DEADBAND_MS",
              "SERVO_TIME_S", "SERVO_MAX_RATE", "GIL_SWITCH_MS"]

STATS_PREFIX = "stats:"  # the final summary line starts with this (tests and scripts parse it)
READY_LINE = "live: running, Ctrl+C stops"  # printed once audio is flowing
FIXED_LINE = "delay fixed:"  # starts the line printed when settling ends (each time the devices open)


# --------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------
class RingBuffer:
    """Single-producer single-consumer float32 ring. Only the producer moves .written, only the consumer .read,
    so the two sides need no lock (each counter update is atomic under the GIL)."""

    def __init__(self, capacity):
        self.buf = np.zeros(int(capacity), np.float32)
        self.capacity = int(capacity)
        self.written = 0
        self.read = 0

    def depth(self):
        return self.written - self.read

    def write(self, data):
        """Producer: append; returns how many samples did not fit (dropped, newest first)."""
        n = len(data)
        take = min(n, self.capacity - (self.written - self.read))
        start = self.written % self.capacity
        first = min(take, self.capacity - start)
        self.buf[start:start + first] = data[:first]
        if take > first:
            self.buf[:take - first] = data[first:take]
        self.written += take
        return n - take

    def read_into(self, out):
        """Consumer: fill the front of out; returns how many samples it got."""
        n = min(len(out), self.written - self.read)
        start = self.read % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self.buf[start:start + first]
        if n > first:
            out[first:n] = self.buf[:n - first]
        self.read += n
        return n

    def peek_into(self, out):
        """Consumer: copy the oldest len(out) samples (there must be as many) without consuming them."""
        n = len(out)
        start = self.read % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self.buf[start:start + first]
        if n > first:
            out[first:n] = self.buf[:n - first]

    def skip(self, n):
        """Consumer: drop the n oldest samples (realign)."""
        self.read += max(0, min(n, self.written - self.read))


class Bypass:
    """The A/B switch: the chain's output, or the raw input delayed by exactly the chain's latency, crossfaded."""

    def __init__(self, delay_samples, fade_ms=BYPASS_FADE_MS, on=False):
        self.line = np.zeros(delay_samples, np.float32)
        self.on = on
        self.mix = 1.0 if on else 0.0  # 0 = denoised, 1 = raw
        self.step = 1000.0 / (fade_ms * SAMPLE_RATE)

    def toggle(self):
        self.on = not self.on
        return self.on

    def reset(self):
        self.line[:] = 0.0

    def process(self, x, y):
        buf = np.concatenate([self.line, x])
        raw, self.line = buf[:len(x)], buf[len(x):]
        target = 1.0 if self.on else 0.0
        if self.mix == target:
            return raw if self.on else y
        ramp = self.mix + np.sign(target - self.mix) * self.step * np.arange(1, len(x) + 1, dtype=np.float32)
        ramp = np.clip(ramp, 0.0, 1.0).astype(np.float32)
        self.mix = float(ramp[-1]) if len(ramp) else self.mix
        return y * (1.0 - ramp) + raw * ramp


def _db(power):
    return 10.0 * math.log10(power) if power > 1e-12 else -120.0


class LiveEngine:
    """Streams, ring buffers, processing thread and counters. The callbacks are plain methods so they can be
    driven directly (tests) as well as by sounddevice."""

    COUNTERS = ("overruns", "underruns", "realigns", "device_xruns", "device_losses")

    def __init__(self, chain, block_ms=BLOCK_MS, out_target_ms=OUT_TARGET_MS, out_realign_ms=OUT_REALIGN_MS,
                 in_realign_ms=IN_REALIGN_MS, buffer_cap_ms=BUFFER_CAP_MS, device_latency=DEVICE_LATENCY,
                 resample_quality=RESAMPLE_QUALITY, settle_delay_s=SETTLE_DELAY_S, fade_ms=FADE_MS,
                 out_target_max_ms=OUT_TARGET_MAX_MS, reanchor_ms=REANCHOR_MS, bypass=BYPASS,
                 bypass_fade_ms=BYPASS_FADE_MS, delay_window=DELAY_WINDOW, servo=SERVO,
                 servo_deadband_ms=SERVO_DEADBAND_MS, servo_time_s=SERVO_TIME_S, servo_max_rate=SERVO_MAX_RATE):
        self.chain = chain
        self.delay_window, self.servo = int(delay_window), servo
        self.servo_deadband_ms, self.servo_time_s, self.servo_max_rate = servo_deadband_ms, servo_time_s, servo_max_rate
        self.bypass = Bypass(chain.latency_samples, bypass_fade_ms, bypass)
        self.reanchor_ms = reanchor_ms
        self.settle_delay_s, self.fade_ms, self.out_target_max_ms = settle_delay_s, fade_ms, out_target_max_ms
        self.block_ms = block_ms
        self.out_target_ms = out_target_ms
        self.out_realign_ms = out_realign_ms
        self.in_realign_ms = in_realign_ms
        self.buffer_cap_ms = buffer_cap_ms
        self.device_latency = device_latency
        self.resample_quality = resample_quality
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.error = None  # exception that stopped the processing thread
        self.in_stream = self.out_stream = None
        self.in_rate = self.out_rate = SAMPLE_RATE
        self.in_calls = self.out_calls = 0  # callback heartbeats
        self.in_frames = self.out_frames = 0  # what the devices delivered and took, at their own rates
        self._thread = None
        self._running = False
        self._wake = threading.Event()
        self._levels = [0.0, 0, 0.0, 0]  # input power sum, input samples, output power sum, output samples
        self._proc_time = [0.0, 0.0]  # seconds spent in chain.process, seconds of audio it handled
        self.chain_burst_ms = 0.0  # how late the chain's slow calls return (warm_up), times the margin
        self.configure(SAMPLE_RATE, SAMPLE_RATE)

    # -- set-up --------------------------------------------------------------------------------------------------
    def configure(self, in_rate, out_rate):
        """Fresh buffers and resamplers for these device rates (no stream may be running)."""
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.in_ring = RingBuffer(self.buffer_cap_ms * self.in_rate // 1000)
        self.out_ring = RingBuffer(self.buffer_cap_ms * self.out_rate // 1000)
        self._in_block = max(1, self.block_ms * self.in_rate // 1000)
        self._in_realign = max(2 * self._in_block, self.in_realign_ms * self.in_rate // 1000)
        self.in_resampler = self.out_resampler = None
        self._resampler_delay_ms = self._resampler_burst_ms = 0.0
        if self.in_rate != SAMPLE_RATE:
            self.in_resampler = self._make_resampler(self.in_rate, SAMPLE_RATE)
        if self.out_rate != SAMPLE_RATE:
            self.out_resampler = self._make_resampler(SAMPLE_RATE, self.out_rate)
        self._set_cushion()
        self._priming = True  # at start: silence until the cushion is full, once
        self._fade = max(1, int(self.fade_ms * self.out_rate / 1000))
        self._ramp = np.linspace(0.0, 1.0, self._fade + 2, dtype=np.float32)[1:-1, None]
        self._dropout = False
        self._debt = 0  # output samples a dropout stood in for: dropped when audio returns, so the delay stays
        self._playing_since = None  # output callback count when audio first played
        self._dropout_since = 0  # output callback count when the current dropout began
        self._settle_calls = int(self.settle_delay_s * 1000 / self.block_ms)
        self.settle_growth_ms = 0.0
        self.settle_topup_ms = 0.0  # the part of settle_growth_ms that refilled a ring found low at its end
        self._fixed = False  # settling is over: running dry is a dropout from now on
        self._topped_up = False  # the one refill at the end of settling has been asked for
        self._depths = np.zeros(self.delay_window, np.int64)  # ring depth at recent output blocks, for that refill
        self._depth_i = 0
        self._out_block = max(1, self.block_ms * self.out_rate // 1000)
        # The delay meter, on PortAudio's clock: the ADC time of the latest input block's first sample, which input
        # position the audio at an output ring position came from, and the mic-to-cable delays of recent blocks.
        self._adc_anchor = None  # (in_ring position, its ADC time in s)
        self._src_anchor = None  # (out_ring position, in_ring position of the chunk the chain made it from)
        self._src_lag = (self.chain.latency_samples / SAMPLE_RATE + self._resampler_delay_ms / 1000.0) * self.in_rate
        self._delays = np.full(self.delay_window, np.nan)
        self._delay_i = 0
        self.target_delay_ms = None  # the delay as fixed after settling; the servo holds it there
        self._fixed_at = None  # the meter's block count when settling ended
        self.servo_rate = 0.0  # > 0: the output plays this much faster than the input (the delay shrinks)
        self._phase = 0.0  # fractional read position while the servo stretches
        self._stretch_t = np.arange(4 * self._out_block, dtype=np.float64)
        self._stretch_buf = np.zeros(len(self._stretch_t) + 2, np.float32)

    def _set_cushion(self):
        """Output cushion = OUT_TARGET_MS + what arrives in bursts: soxr releases blocks, and a chain that runs a
        model once per hop returns late on that call (the output drains meanwhile), by as much as warm_up
        measured. Set once before the devices start: the delay from microphone to cable never moves after."""
        cushion_ms = min(self.out_target_ms + self._resampler_burst_ms + self.chain_burst_ms,
                         max(self.out_target_ms, self.out_target_max_ms))
        target = max(1, int(cushion_ms * self.out_rate / 1000))
        self._out_realign = target + max(1, self.out_realign_ms * self.out_rate // 1000)
        self._out_target = target
        self.cushion_ms = cushion_ms

    def warm_up(self, seconds=WARMUP_S, margin=CUSHION_MARGIN):
        """Run the chain on silence in device-sized blocks and size the cushion from its slowest call (its third
        slowest: onnxruntime allocates on the first runs). The chain then starts as on a silent microphone."""
        block = np.zeros(max(1, self.block_ms * SAMPLE_RATE // 1000), np.float32)
        times = []
        for _ in range(max(0, int(seconds * 1000 / self.block_ms))):
            started = time.perf_counter()
            self.chain.process(block)
            times.append(1000.0 * (time.perf_counter() - started))
        slow = sorted(times)[-3] if len(times) >= 3 else max(times, default=0.0)
        self.chain_burst_ms = margin * slow
        self._set_cushion()
        return self.chain_burst_ms

    def _make_resampler(self, from_rate, to_rate):
        """A soxr stream, after measuring on a twin fed with silence how long it holds samples back and how
        unevenly it releases them (both add to the latency and the needed cushion)."""
        import soxr  # only needed when a device refuses 16 kHz

        probe = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality=self.resample_quality)
        block = np.zeros(max(1, self.block_ms * from_rate // 1000), np.float32)
        longest = max(len(probe.resample_chunk(block)) for _ in range(50))
        self._resampler_delay_ms += 1000.0 * probe.delay() / to_rate
        self._resampler_burst_ms += max(0.0, 1000.0 * longest / to_rate - self.block_ms)
        return soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality=self.resample_quality)

    def resampler_delay_ms(self):
        return self._resampler_delay_ms

    # -- callbacks (no allocation of buffers, no printing, no blocking) -------------------------------------------
    def on_input(self, indata, frames, time_info, status):
        self.in_calls += 1
        self.in_frames += frames
        if status:
            self.counts["device_xruns"] += 1
        if time_info is not None:
            self._adc_anchor = (self.in_ring.written, time_info.inputBufferAdcTime)
        if self.in_ring.write(indata[:, 0]):
            self.counts["overruns"] += 1
        self._wake.set()

    def on_output(self, outdata, frames, time_info, status):
        """Play the cushion's oldest samples. While settling (the first SETTLE_DELAY_S of audio) a dry ring is
        refilled to the cushion, which grows the delay by what the devices' jitter needed, and so is one that sat
        well below it when settling ends (see _ran_low). After that the delay is fixed: when the chain is late and
        the ring runs dry, the output fades out, plays silence (a dropout, counted once as an underrun) and, when
        audio returns, skips exactly the samples the silence stood in for, fading back in; audio lost on the way
        in leaves the ring low once that is paid, and it is refilled first. FADE_MS samples are always held back,
        so a fade-out has audio to fade."""
        self.out_calls += 1
        self.out_frames += frames
        if status:
            self.counts["device_xruns"] += 1
        ring, out = self.out_ring, outdata[:, :1]
        depth = ring.depth()
        fade_in = False
        if self._priming:
            if depth < max(self._out_target, frames) + self._fade:
                outdata.fill(0)
                if self._playing_since is not None and not self._fixed:  # a refill while settling: delay grows
                    self.settle_growth_ms += 1000.0 * frames / self.out_rate
                    if self._topped_up:
                        self.settle_topup_ms += 1000.0 * frames / self.out_rate
                return
            self._priming = False
            fade_in = self._playing_since is not None  # back from a refill
            if self._playing_since is None:  # the very start: a burst may have filled it past the cushion
                self._playing_since = self.out_calls
                if depth > self._out_target + self._fade:
                    ring.skip(depth - self._out_target - self._fade)
                    depth = self._out_target + self._fade
        if not self._fixed:
            if self.out_calls - self._playing_since < self._settle_calls:
                self._depths[self._depth_i % self.delay_window] = depth
                self._depth_i += 1
            elif self._ran_low():  # refill once more, then fix the delay
                got = self._fade_out(out, min(depth, frames))
                self._priming = True
                self.settle_growth_ms += 1000.0 * (frames - got) / self.out_rate
                self.settle_topup_ms += 1000.0 * (frames - got) / self.out_rate
                if outdata.shape[1] > 1:
                    outdata[:, 1:] = outdata[:, :1]
                return
            else:
                self._fixed = True
        if self._dropout:
            drop = min(self._debt, depth)
            ring.skip(drop)
            self._debt -= drop
            depth -= drop
            late_ms = (self.out_calls - self._dropout_since) * frames * 1000.0 / self.out_rate
            # With no backlog left to catch up on, audio was lost before it reached us (the sound server dropped
            # microphone blocks) when the debt is still owed after REANCHOR_MS (what the silence stood for will
            # never come), or is paid but leaves the ring low (resuming there, every bit of jitter would be another
            # dropout). Start again from a full cushion, which puts the delay back where it was (a realign).
            if self.in_ring.depth() < 2 * self._in_block and (
                    late_ms > self.reanchor_ms if self._debt else depth < max(self._low_mark(), frames + self._fade)):
                self._refill_after_loss(outdata)
                return
            if self._debt or depth < frames + self._fade:
                outdata.fill(0)
                self._debt += frames
                return
            self._dropout, fade_in = False, True
        elif depth > self._out_realign:
            ring.skip(depth - self._out_target)
            self.counts["realigns"] += 1
            depth = self._out_target
        if depth >= frames + self._fade:
            if time_info is not None:
                self._measure_delay(time_info.outputBufferDacTime, ring.read)
                self._servo_step()
            if not self.servo_rate or not self._read_stretched(out[:, 0], frames, depth):
                ring.read_into(out[:, 0])
        else:  # running dry: play what there is, faded out
            got = self._fade_out(out, depth)
            self.counts["underruns"] += 1
            if not self._fixed:
                self._priming = True  # settling: refill, the delay grows
                self.settle_growth_ms += 1000.0 * (frames - got) / self.out_rate
            else:
                self._dropout, self._debt = True, frames - got  # owe the rest
                self._dropout_since = self.out_calls
            fade_in = False
        if fade_in:
            n = min(self._fade, frames)
            out[:n] *= self._ramp[:n]
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]

    def _low_mark(self):
        """The ring depth below which the cushion no longer covers the chain's slow hops: a quarter of it (at
        least a block) under full."""
        return self._out_target + self._fade - max(self._out_target // 4, self._out_block)

    def _refill_after_loss(self, outdata):
        """Audio lost before it reached us shrinks the delay and leaves the ring without its cushion: stay silent
        until the cushion is full again, which puts the delay back where it was fixed (a realign, counted)."""
        self._dropout, self._debt, self._priming = False, 0, True
        self.counts["realigns"] += 1
        outdata.fill(0)

    def _fade_out(self, out, n):
        """Play the ring's next n samples into out, the last FADE_MS of them faded out, silence after; returns n."""
        got = self.out_ring.read_into(out[:n, 0])
        k = min(self._fade, got)
        out[got - k:got] *= self._ramp[::-1][self._fade - k:]
        out[got:] = 0.0
        return got

    def _ran_low(self):
        """Asked once, when settling ends: whether over the last blocks the ring sat more than a quarter of the
        cushion below it without running dry. PipeWire's rate matching between two ALSA streams drains it by tens
        of ms in their first seconds, and a ring left that low turns the chain's ordinary slow hops into dropouts
        once the delay is fixed; it is refilled then, the last growth of the delay while settling."""
        if self._topped_up:
            return False
        self._topped_up = True
        n = min(self._depth_i, self.delay_window)
        return n > 0 and np.median(self._depths[:n]) < self._low_mark()

    def delay_fixed(self):
        """True once the first SETTLE_DELAY_S of audio are over (and the ring refilled, if it ran low): from then
        on running dry is a dropout, and the delay no longer grows."""
        return self._fixed

    def _measure_delay(self, dac_time, out_pos):
        """Mic-to-cable delay of the output sample at out_pos, to be played at dac_time: the ADC time of the input
        sample it came from, found through the two anchors, subtracted. Skips a block when an anchor is missing."""
        adc, src = self._adc_anchor, self._src_anchor
        if adc is None or src is None or not dac_time or not adc[1]:  # a host API that leaves the times at 0
            return
        source = src[1] + (out_pos - src[0]) * self.in_rate / self.out_rate - self._src_lag
        delay = 1000.0 * (dac_time - adc[1] - (source - adc[0]) / self.in_rate)
        if not 0.0 < delay < MAX_PLAUSIBLE_DELAY_MS:  # clocks that are not one clock: no reading, no servo
            return
        self._delays[self._delay_i % self.delay_window] = delay
        self._delay_i += 1

    def delay_ms(self, last=None):
        """Median mic-to-cable delay of the last DELAY_WINDOW (or `last`) output blocks that carried audio
        (PortAudio's clocks: the devices' reported buffering included); None before any."""
        if self._delay_i == 0:
            return None
        n = min(self._delay_i, self.delay_window, last or self.delay_window)
        idx = (self._delay_i - 1 - np.arange(n)) % self.delay_window
        return float(np.median(self._delays[idx]))

    def _servo_step(self):
        """Once the delay is fixed, fix the meter's reading as the target; then every tenth block set the speed
        that closes the gap with SERVO_TIME_S, starting beyond SERVO_DEADBAND_MS and stopping within a quarter
        of it. A dropout's skip and a realign keep the delay in whole blocks; this keeps it to the sample."""
        if self._delay_i % 10:
            return
        if self.target_delay_ms is None:
            if not self._fixed:
                return
            if self._fixed_at is None:
                self._fixed_at = self._delay_i
            if self._delay_i - self._fixed_at >= self.delay_window:  # a window measured wholly after settling
                self.target_delay_ms = self.delay_ms()
            return
        if not self.servo:
            return
        error = self.delay_ms(self.delay_window // 2) - self.target_delay_ms
        if abs(error) < self.servo_deadband_ms / 4 or (not self.servo_rate and abs(error) < self.servo_deadband_ms):
            self.servo_rate, self._phase = 0.0, 0.0
            return
        self.servo_rate = max(-self.servo_max_rate, min(self.servo_max_rate, error / (1000.0 * self.servo_time_s)))

    def _read_stretched(self, out, frames, depth):
        """Fill out from the ring read 1 + servo_rate times as fast, by linear interpolation; False (nothing read)
        when the block is larger than the scratch or the ring holds too little."""
        rate = 1.0 + self.servo_rate
        if frames > len(self._stretch_t):
            return False
        t = self._phase + rate * self._stretch_t[:frames]
        need = int(t[-1]) + 2
        # Speeding up never eats the last quarter of the cushion: a shift in the devices' buffering larger than the
        # cushion would otherwise leave the ring bare, and then every bit of scheduling jitter is a dropout.
        keep = self._out_target // 4 if rate > 1.0 else 0
        if need + self._fade + keep > depth:
            return False
        buf = self._stretch_buf[:need]
        self.out_ring.peek_into(buf)
        i = t.astype(np.int64)
        frac = (t - i).astype(np.float32)
        out[:] = buf[i] * (1.0 - frac) + buf[i + 1] * frac
        end = self._phase + rate * frames
        self.out_ring.skip(int(end))
        self._phase = end - int(end)
        return True

    def credit(self, in_samples):
        """Input the processing thread dropped stands for output a dropout still owes."""
        if self._dropout:
            self._debt = max(0, self._debt - int(in_samples * self.out_rate / self.in_rate))

    # -- processing thread ---------------------------------------------------------------------------------------
    def start_processing(self):
        self._running = True
        self._thread = threading.Thread(target=self._process_loop, name="denoiser-processing", daemon=True)
        self._thread.start()

    def stop_processing(self):
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _process_loop(self):
        try:
            self._process_until_stopped()
        except Exception as exc:  # reported by the main thread as a one-line error
            self.error = exc
            self._running = False

    def _process_until_stopped(self):
        in_ring, out_ring = self.in_ring, self.out_ring
        scratch = np.zeros(4 * self._in_block, np.float32)
        while self._running:
            self._wake.clear()
            depth = in_ring.depth()
            if depth == 0:
                # An event wakes this thread the moment the input callback delivers; a positive sleep would wait
                # at least ~15.6 ms on Windows.
                self._wake.wait(0.05)
                continue
            # A backlog behind a dropout is caught up on (the output drops what it already stood in for, so the
            # delay stays); one with no dropout means the input runs ahead of the output: cut back, counted.
            if depth > (in_ring.capacity // 2 if self._dropout else self._in_realign):
                keep = self._in_block + (self._out_target * self.in_rate // self.out_rate if self._dropout else 0)
                in_ring.skip(depth - keep)
                self.credit(depth - keep)
                self.counts["realigns"] += 1
            source = in_ring.read
            n = in_ring.read_into(scratch)
            x = scratch[:n].copy()
            if self.in_resampler is not None:
                x = self.in_resampler.resample_chunk(x)
                if len(x) == 0:
                    continue
            started = time.perf_counter()
            y = self.bypass.process(x, np.asarray(self.chain.process(x), dtype=np.float32))
            took = time.perf_counter() - started
            self._proc_time[0] += took
            self._proc_time[1] += len(x) / SAMPLE_RATE
            self._levels[0] += float(np.dot(x, x))
            self._levels[1] += len(x)
            self._levels[2] += float(np.dot(y, y))
            self._levels[3] += len(y)
            if self.out_resampler is not None:
                y = self.out_resampler.resample_chunk(y)
            self._src_anchor = (out_ring.written, source)
            if out_ring.write(y):
                self.counts["overruns"] += 1
            time.sleep(0)  # let the audio callbacks' threads take the GIL between chunks

    # -- streams -------------------------------------------------------------------------------------------------
    def _pick_format(self, sd, kind, index):
        """(rate, channels) to open: 16 kHz mono when the device accepts it, else its own rate / 2 channels."""
        info = sd.query_devices(index)
        max_channels = info[channels_key(kind)]
        for rate in (SAMPLE_RATE, int(info["default_samplerate"])):
            for channels in sorted({1, min(2, max_channels)}):
                if settings_ok(sd, kind, index, rate, channels):
                    return rate, channels
        raise DeviceError("%s device %d (%s) opens neither at 16000 Hz nor at its own %d Hz"
                          % (kind, index, info["name"], int(info["default_samplerate"])))

    def open_streams(self, mic_index, cable_index):
        sd = sounddevice_module()
        in_rate, in_channels = self._pick_format(sd, "input", mic_index)
        out_rate, out_channels = self._pick_format(sd, "output", cable_index)
        self.stop_processing()
        self.configure(in_rate, out_rate)
        self.out_stream = sd.OutputStream(
            device=cable_index, samplerate=out_rate, channels=out_channels, dtype="float32",
            blocksize=max(1, self.block_ms * out_rate // 1000), latency=self.device_latency,
            callback=self.on_output, extra_settings=extra_settings(sd, cable_index))
        try:
            self.in_stream = sd.InputStream(
                device=mic_index, samplerate=in_rate, channels=in_channels, dtype="float32",
                blocksize=self._in_block, latency=self.device_latency, callback=self.on_input,
                extra_settings=extra_settings(sd, mic_index))
        except Exception:
            self.close_streams()
            raise
        self.start_processing()
        self.out_stream.start()
        self.in_stream.start()

    def close_streams(self):
        for stream in (self.in_stream, self.out_stream):
            if stream is not None:
                try:
                    stream.abort(ignore_errors=True)
                    stream.close(ignore_errors=True)
                except Exception:  # a vanished device may fail to close; it is gone either way
                    pass
        self.in_stream = self.out_stream = None
        self.stop_processing()

    def device_latency_ms(self):
        total = 0.0
        for stream in (self.in_stream, self.out_stream):
            if stream is not None:
                total += 1000.0 * float(stream.latency)
        return total

    def latency_parts_ms(self):
        """(algorithm, buffering, devices) in ms: what a sample spends from microphone to cable."""
        algorithm = 1000.0 * self.chain.latency_samples / SAMPLE_RATE
        buffering = self.block_ms + self.cushion_ms + self.fade_ms + self.resampler_delay_ms()
        return algorithm, buffering, self.device_latency_ms()

    # -- status --------------------------------------------------------------------------------------------------
    def take_levels(self):
        """(input dBFS, output dBFS, processing load 0..1) since the previous call."""
        lv, self._levels = self._levels, [0.0, 0, 0.0, 0]
        pt, self._proc_time = self._proc_time, [0.0, 0.0]
        in_db = _db(lv[0] / lv[1]) if lv[1] else -120.0
        out_db = _db(lv[2] / lv[3]) if lv[3] else -120.0
        load = pt[0] / pt[1] if pt[1] else 0.0
        return in_db, out_db, load

    def buffer_ms(self):
        return (1000.0 * self.in_ring.depth() / self.in_rate, 1000.0 * self.out_ring.depth() / self.out_rate)


def format_status(engine, chain_status, levels):
    """One status line: mode, levels, gate, processing time per hop against its budget, buffer depths, counters."""
    in_db, out_db, load = levels
    in_ms, out_ms = engine.buffer_ms()
    c = engine.counts
    hop, budget = chain_status.get("hop_ms"), chain_status.get("hop_budget_ms")
    hop_text = ("hop %.1f/%.0fms" % (hop, budget)) if hop is not None and budget else "load %.0f%%" % (100 * load)
    gate = chain_status.get("gate_open")
    gate_text = ("gate %3.0f%%" % (100.0 * gate)) if gate is not None else "gate -"
    mode = "BYPASS (raw mic)" if engine.bypass.on else "denoising"
    delay = engine.delay_ms()
    delay_text = "delay %.0fms" % delay if delay is not None else "delay -"
    if engine.servo_rate and engine.target_delay_ms is not None:  # a stall or the devices moved it: on its way back
        delay_text += " (returning to %.0f)" % engine.target_delay_ms
    return ("%s in %5.1f out %5.1f dBFS %s %s buf %.0f+%.0fms %s over %d under %d realign %d"
            % (mode, max(in_db, -99.9), max(out_db, -99.9), gate_text, hop_text, in_ms, out_ms, delay_text,
               c["overruns"], c["underruns"], c["realigns"]))


def parse_stats(text):
    """The counters from the last 'stats:' line in text, as a dict of numbers (for tests and scripts)."""
    lines = [line for line in text.splitlines() if line.startswith(STATS_PREFIX)]
    if not lines:
        return None
    result = {}
    for item in lines[-1][len(STATS_PREFIX):].split():
        key, _, value = item.partition("=")
        result[key] = float(value) if "." in value else int(value)
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def add_arguments(parser, mic_default=None, cable_default=None):
    """Add --mic, --cable, --quiet, --list and the live tunables to a pipeline's argparse parser."""
    group = parser.add_argument_group("live audio (see live_audio.py)")
    group.add_argument("--mic", default=mic_default,
                       help="microphone: device index or part of its name (default: %s)"
                            % (mic_default if mic_default is not None else "the system's default input"))
    group.add_argument("--cable", default=cable_default,
                       help="virtual cable to write to: index or part of its name (default: %s)"
                            % (cable_default if cable_default is not None else
                               "'CABLE Input' on Windows, 'BlackHole' on macOS, 'denoiser_cable' on Linux"))
    group.add_argument("--quiet", action="store_true", help="no status line")
    group.add_argument("--list", action="store_true", help="list sound devices and exit")
    import dsp
    dsp.add_constant_flags(group, globals(), LIVE_FLAGS, __file__)
    group.add_argument("--settle-s", type=float, default=None,
                       help="start-up not counted in settled_* (default: the pipeline's STARTUP_BUFFER_MS)")
    return parser


def _option(args, name, default):
    value = getattr(args, name, None)
    return default if value is None else value


def _check_options(args):
    """The live settings (flags, already held to their ranges, or the constants), cross-checked."""
    values = {name.lower(): _option(args, name.lower(), globals()[name]) for name in LIVE_FLAGS}
    if values["buffer_cap_ms"] < values["out_target_ms"] + values["out_realign_ms"] + values["block_ms"] or \
            values["buffer_cap_ms"] < values["in_realign_ms"] + values["block_ms"]:
        raise DeviceError("--buffer-cap-ms must exceed the cushion plus the realign thresholds")
    latency = values["device_latency"]
    if latency not in ("low", "high"):
        try:
            latency = float(latency)
        except (TypeError, ValueError):
            raise DeviceError("--device-latency must be low, high or seconds, got %s" % latency)
        if not 0 < latency <= 2:
            raise DeviceError("--device-latency in seconds must be between 0 and 2, got %s" % latency)
    values["device_latency"] = latency
    if values["resample_quality"] not in ("QQ", "LQ", "MQ", "HQ", "VHQ"):
        raise DeviceError("--resample-quality must be QQ, LQ, MQ, HQ or VHQ, got %s" % values["resample_quality"])
    settle = getattr(args, "settle_s", None)
    if settle is not None and not 0 <= settle <= 60:
        raise DeviceError("--settle-s must be between 0 and 60, got %s" % settle)
    values["settle_s"] = settle
    return values


class _Session:
    """run_live's state between the main loop, status display and fault handling."""

    def __init__(self, chain, args, out, err, warn_interval_s=WARN_INTERVAL_S):
        self.chain, self.args, self.out, self.err = chain, args, out, err
        self.warn_interval_s = warn_interval_s
        self.quiet = bool(getattr(args, "quiet", False))
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.status_shown = False
        self.status_width = 0
        self.last_warn = {}
        self.warn_seen = {}

    def say(self, text, stream=None):
        stream = stream or self.out
        if self.status_shown:
            self.out.write("\n")
            self.status_shown = False
        print(text, file=stream, flush=True)

    def status(self, text):
        if self.quiet:
            return
        if self.tty:
            # Never wider than the terminal (a wrapped line cannot be redrawn in place); pad with spaces rather
            # than an ANSI erase, which Windows consoles may print literally.
            import shutil
            text = text[:max(20, shutil.get_terminal_size((100, 20)).columns - 1)]
            self.out.write("\r" + text.ljust(self.status_width))
            self.out.flush()
            self.status_width = len(text)
            self.status_shown = True
        else:
            print(text, file=self.out, flush=True)

    def warn(self, kind, count, advice):
        """At most one warning of each kind per --warn-interval-s, giving the count so far."""
        now = time.monotonic()
        seen = self.warn_seen.get(kind, 0)
        if count <= seen or now - self.last_warn.get(kind, -1e9) < self.warn_interval_s:
            return
        self.say("warning: %d %s so far; %s" % (count, kind, advice), self.err)
        self.warn_seen[kind] = count
        self.last_warn[kind] = now


def run_live(chain, args):
    """Stream microphone -> chain -> cable until Ctrl+C (or SIGTERM). Returns the exit code.

    Prints the latency and READY_LINE at start, a status line every STATUS_INTERVAL_S unless --quiet, and a final
    'stats: ...' line (see parse_stats) with the counters, also counted from when the delay was fixed
    (settled_*: after SETTLE_DELAY_S of audio and at least SETTLE_S).
    """
    out, err = sys.stdout, sys.stderr
    try:
        opts = _check_options(args)
        mic_spec = parse_device_spec(getattr(args, "mic", None))
        cable_spec = parse_device_spec(getattr(args, "cable", None))
        if getattr(args, "list", False):
            return print_devices(mic_spec, cable_spec)
        mic_index = resolve(mic_spec, "input")
        cable_index = resolve(cable_spec, "output")
        check_not_own_output(mic_index, cable_index)
        identities = (device_identity(mic_index), device_identity(cable_index))
    except DeviceError as exc:
        print("error: %s" % exc, file=err)
        if exc.details:
            print(exc.details, file=err)
        return 1

    engine = LiveEngine(chain, block_ms=opts["block_ms"], out_target_ms=opts["out_target_ms"],
                        out_realign_ms=opts["out_realign_ms"], in_realign_ms=opts["in_realign_ms"],
                        buffer_cap_ms=opts["buffer_cap_ms"], device_latency=opts["device_latency"],
                        resample_quality=opts["resample_quality"], settle_delay_s=opts["settle_delay_s"],
                        fade_ms=opts["fade_ms"], out_target_max_ms=opts["out_target_max_ms"],
                        reanchor_ms=opts["reanchor_ms"], bypass=opts["bypass"],
                        bypass_fade_ms=opts["bypass_fade_ms"], delay_window=opts["delay_window"],
                        servo=opts["servo"], servo_deadband_ms=opts["servo_deadband_ms"],
                        servo_time_s=opts["servo_time_s"], servo_max_rate=opts["servo_max_rate"])
    session = _Session(chain, args, out, err, opts["warn_interval_s"])
    engine.warm_up(opts["warmup_s"], opts["cushion_margin"])
    # The device callbacks are Python, so each waits for the interpreter lock; by default a thread that wants it
    # waits 5 ms before the holder is asked to let go (longer if the OS preempts the holder on a busy machine),
    # and a callback that late can miss its device period.
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(opts["gil_switch_ms"] / 1000.0)
    old_handlers = _install_stop_signals()
    toggles = _install_bypass_toggles(engine)
    watch = None
    started = None
    settled_base = settled_frames = None
    was_fixed = False
    fixed_at = delay_start = delay_end = None
    code = 0
    try:
        try:
            engine.open_streams(mic_index, cable_index)
        except DeviceError:
            raise
        except Exception as exc:
            raise DeviceError("could not open the devices: %s" % exc)
        _announce(engine, session, identities, mic_index, cable_index)
        watch = ListenerWatch.start(cable_index) if opts["idle"] else None
        idle = False
        # The pipelines say how long their start-up takes to settle (STARTUP_BUFFER_MS); SETTLE_S otherwise.
        settle_s = opts["settle_s"]
        if settle_s is None:
            settle_s = getattr(chain, "startup_ms", SETTLE_S * 1000.0) / 1000.0
        started = time.monotonic()
        next_status = started + opts["status_interval_s"]
        calls, last_call = [engine.in_calls, engine.out_calls], [started, started]
        slow_hops = 0
        while True:
            if idle:  # asleep until pactl reports a stream, a toggle or the next status line
                watch.changed.wait(opts["status_interval_s"])
            else:
                time.sleep(0.05)
            now = time.monotonic()
            while toggles:
                toggles.pop()
                session.say("bypass %s" % ("on: the raw microphone, same delay (Enter or SIGUSR1: back to denoising)"
                                           if engine.bypass.on else "off: denoising"))
            if watch is not None and watch.listening == idle:
                watch.changed.clear()
                idle = _set_idle(engine, session, not watch.listening, mic_index, cable_index)
                now = time.monotonic()
                calls, last_call = [engine.in_calls, engine.out_calls], [now, now]
            if idle:
                if now >= next_status:
                    next_status = now + opts["status_interval_s"]
                    session.status("idle (no app listening): microphone closed, model not running")
                continue
            if engine.error is not None:
                raise DeviceError("processing failed: %s: %s" % (type(engine.error).__name__, engine.error))
            fixed = engine.delay_fixed()
            if fixed and fixed_at is None:
                fixed_at = now
            if fixed and not was_fixed:
                session.say(FIXED_LINE + " running dry is now a faded dropout (the cushion grew %.0f ms while "
                            "settling, %.0f ms of it refilling a ring found low at its end)"
                            % (engine.settle_growth_ms, engine.settle_topup_ms))
                settled_frames = (engine.in_frames, engine.out_frames)  # from each fix: reopened devices fix again
            was_fixed = fixed
            # Refills while the delay settles are how it finds the devices' jitter; settled_* count what follows.
            if settled_base is None and fixed and now - started >= settle_s:
                settled_base = dict(engine.counts)
            if delay_start is None and fixed_at is not None and now - fixed_at >= opts["delay_start_s"]:
                delay_start = engine.delay_ms()
            for i, value in enumerate((engine.in_calls, engine.out_calls)):
                if value != calls[i]:
                    calls[i], last_call[i] = value, now
            lost = _lost_device(engine, now - last_call[0], now - last_call[1], opts["device_stall_s"])
            if lost:
                engine.counts["device_losses"] += 1
                mic_index, cable_index = _recover(engine, session, lost, identities, mic_spec, opts)
                now = time.monotonic()
                calls, last_call = [engine.in_calls, engine.out_calls], [now, now]
                continue
            if now >= next_status:
                next_status = now + opts["status_interval_s"]
                slow_hops += _show_status(engine, session, chain, slow_hops)
    except KeyboardInterrupt:
        pass
    except DeviceError as exc:
        session.say("error: %s" % exc, err)
        if exc.details:
            print(exc.details, file=err)
        code = 1
    finally:
        _ignore_stop_signals()
        if watch is not None:
            watch.stop()
        delay_end = engine.delay_ms()
        engine.close_streams()
        _restore_signals(old_handlers)
        sys.setswitchinterval(old_switch)
        seconds = time.monotonic() - started if started is not None else 0.0
        settled = {k: engine.counts[k] - (settled_base or engine.counts)[k] for k in LiveEngine.COUNTERS}
        figures = [("delay_start_ms", delay_start), ("delay_end_ms", delay_end)]
        if settled_frames is not None:
            # Since the delay was last fixed. Positive: the microphone delivered less than the cable took. Two clocks
            # drift by a few ms a minute; more is audio lost before it reached us, which no cushion keeps from
            # becoming dropouts.
            took_s = (engine.out_frames - settled_frames[1]) / engine.out_rate
            got_s = (engine.in_frames - settled_frames[0]) / engine.in_rate
            figures.append(("settled_mic_short_ms", 1000.0 * (took_s - got_s)))
        session.say("%s seconds=%.2f %s %s%s" % (
            STATS_PREFIX, seconds, " ".join("%s=%d" % kv for kv in engine.counts.items()),
            " ".join("settled_%s=%d" % kv for kv in settled.items()),
            "".join(" %s=%.2f" % kv for kv in figures if kv[1] is not None)))
    return code


def _set_idle(engine, session, idle, mic_index, cable_index):
    """Close the devices while no app listens, and flush the chain with silence then, so no stale audio from
    before the pause reaches the next listener and waking up costs no model calls; reopen them when one does.
    Returns the new idle state."""
    if idle:
        engine.close_streams()
        chain = engine.chain  # IDLE_FLUSH_S: the DSP chain's filters ring on past its 5 ms latency
        flush = max(chain.latency_samples + getattr(chain, "frame_samp", 0), int(IDLE_FLUSH_S * SAMPLE_RATE))
        chain.process(np.zeros(flush, np.float32))
        session.say("idle: no app is recording from the cable; microphone closed, model paused")
        return True
    engine.bypass.reset()
    engine.open_streams(mic_index, cable_index)
    session.say("an app is recording from the cable: %s" % ("bypass (raw mic)" if engine.bypass.on else "denoising"))
    return False


def _install_bypass_toggles(engine):
    """Enter in a terminal and SIGUSR1 (no terminal: ./start_pipeline.sh ab) toggle bypass. Returns a list the
    main loop empties, one entry per toggle, to say so."""
    toggles = []

    def toggle(*_):
        engine.bypass.toggle()
        toggles.append(1)

    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
        try:
            signal.signal(signal.SIGUSR1, toggle)
        except (OSError, ValueError):
            pass
    stdin = sys.stdin
    if stdin is not None and hasattr(stdin, "isatty") and stdin.isatty():
        def read_keys():
            for _ in stdin:  # one line per Enter
                toggle()
        threading.Thread(target=read_keys, name="denoiser-keys", daemon=True).start()
    return toggles


def _announce(engine, session, identities, mic_index, cable_index):
    algorithm, buffering, devices = engine.latency_parts_ms()
    session.say("microphone: %d %s [%s, %d Hz]" % (mic_index, identities[0][0], identities[0][1], engine.in_rate))
    session.say("cable:      %d %s [%s, %d Hz]" % (cable_index, identities[1][0], identities[1][1], engine.out_rate))
    session.say("latency: %.1f ms total = %.1f ms algorithm + %.1f ms buffers + %.1f ms devices"
                % (algorithm + buffering + devices, algorithm, buffering, devices))
    session.say("output cushion: %.0f ms (covers the chain's slowest warm-up call x margin, %.0f ms); the delay is "
                "fixed %g s after the audio starts, and a late hop then becomes a faded dropout, not more delay"
                % (engine.cushion_ms, engine.chain_burst_ms, engine.settle_delay_s))
    session.say("A/B: press Enter (or send SIGUSR1) to hear the raw microphone at the same delay, and again to go "
                "back")
    session.say(READY_LINE)


def _show_status(engine, session, chain, slow_hops):
    """The status line and the warnings it leads to; returns 1 when this hop was slower than real time."""
    try:
        chain_status = dict(chain.status() or {})
    except Exception:  # a status display must never stop the audio
        chain_status = {}
    session.status(format_status(engine, chain_status, engine.take_levels()))
    c = engine.counts
    session.warn("underruns", c["underruns"], "processing or the microphone is late: raise --out-target-ms")
    session.warn("overruns", c["overruns"], "buffers overflowed: processing stalled or too slow")
    session.warn("realigns", c["realigns"], "latency was cut back (devices drift, or processing stalled)")
    hop, budget = chain_status.get("hop_ms"), chain_status.get("hop_budget_ms")
    if hop is not None and budget and hop > budget:
        session.warn("slow hops", slow_hops + 1,
                     "processing took %.1f ms for a %.1f ms hop: slower than real time" % (hop, budget))
        return 1
    return 0


def _lost_device(engine, input_silent_s, output_silent_s, stall_s=DEVICE_STALL_S):
    """'microphone' / 'cable' when that stream died or stopped calling back, else None."""
    for label, stream, silent_s in (("microphone", engine.in_stream, input_silent_s),
                                    ("cable", engine.out_stream, output_silent_s)):
        if stream is None or not stream.active or silent_s > stall_s:
            return label
    return None


def _recover(engine, session, lost, identities, mic_spec, opts):
    """Close everything, then re-scan every RETRY_INTERVAL_S until both devices open again."""
    engine.close_streams()
    session.say("warning: the %s stopped (unplugged, asleep or removed); retrying every %.1f s"
                % (lost, opts["retry_interval_s"]), session.err)
    attempts = 0
    while True:
        time.sleep(opts["retry_interval_s"])
        attempts += 1
        try:
            rescan_devices()
            mic_index = find_again(identities[0], "input", mic_spec is None)
            cable_index = find_again(identities[1], "output", False)
            if mic_index is not None and cable_index is not None:
                engine.open_streams(mic_index, cable_index)
                session.say("resumed after %d %s: microphone %d, cable %d"
                            % (attempts, "retry" if attempts == 1 else "retries", mic_index, cable_index))
                return mic_index, cable_index
        except Exception as exc:  # PortAudio refuses while the device is half there; try again
            engine.close_streams()
            if attempts % 10 == 0:
                session.say("warning: still waiting for the %s (%s)" % (lost, exc), session.err)


_STOPPING = [False]


def _raise_interrupt(signum, frame):
    # Once: Ctrl+C in a terminal reaches both the launcher (which forwards SIGTERM) and this process, and a
    # second interrupt must not cut the clean shutdown short.
    if not _STOPPING[0]:
        _STOPPING[0] = True
        raise KeyboardInterrupt


def _install_stop_signals():
    """SIGINT (Ctrl+C) and SIGTERM (the launcher, kill) both stop cleanly. SIGINT is re-armed because a process
    started in the background by a shell inherits it ignored."""
    old = {}
    _STOPPING[0] = False
    if threading.current_thread() is not threading.main_thread():
        return old
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                old[signum] = signal.signal(signum, _raise_interrupt)
            except (OSError, ValueError):
                pass
    return old


def _ignore_stop_signals():
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGINT", "SIGTERM"):
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except (OSError, ValueError, AttributeError):
            pass


def _restore_signals(old):
    for signum, handler in old.items():
        try:
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        except (OSError, ValueError):
            pass
