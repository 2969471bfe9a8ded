"""A private, real sound server for the live-audio tests (PipeWire with its PulseAudio and ALSA faces).

Fixtures (tests/conftest.py imports them for every test file):
  sound_server  session-wide: installs Debian's packages when missing (tests/install_sound_deps.sh, as root),
                starts a private `dbus-daemon --session`, then `pipewire`, `wireplumber` and `pipewire-pulse`
                under a temporary XDG_RUNTIME_DIR, and stops what it started, by PID, at the end. Skips, with
                the reason, only where no server can be started.
  fake_mic      a fake microphone: null sink `fake_mic_sink` plus remap source `fake_mic`; feed it with
                server.play(path). Removed after the test.
  cable         the project's cable: null sink `denoiser_cable` plus source `denoised_mic` (the same
                commands start_pipeline.sh runs). Removed after the test.

The private graph runs at 16 kHz (a pipewire.conf drop-in in the private config dir), so the 16 kHz streams
of the pipelines, paplay and parec pass through PipeWire without resampling and can be compared sample by
sample with file-mode output.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL_SCRIPT = os.path.join(HERE, "install_sound_deps.sh")
NEEDED_BINARIES = ("dbus-daemon", "pipewire", "wireplumber", "pipewire-pulse", "pactl", "paplay", "parec", "pw-link")
GRAPH_RATE_HZ = 16000  # private graph clock; the pipelines' own rate, so no resampler blurs the comparison
GRAPH_QUANTUM_SAMP = 256  # graph period at GRAPH_RATE_HZ (16 ms): small keeps latency low, too small risks xruns
PA_LATENCY_MS = 20  # paplay/parec buffer: their 2 s default garbles short recordings
START_TIMEOUT_S = 20.0  # how long the daemons get to come up on a busy machine

RATE_DROP_IN = """# Written by tests/sound_server.py: run the private test graph at the pipelines' own rate.
context.properties = {
    default.clock.rate = %d
    default.clock.allowed-rates = [ %d ]
    default.clock.quantum = %d
    default.clock.min-quantum = 32
    default.clock.max-quantum = 1024
}
""" % (GRAPH_RATE_HZ, GRAPH_RATE_HZ, GRAPH_QUANTUM_SAMP)

# A healthy server hands a pipeline's microphone stream what its cable takes to within a block or two either side
# (the two streams' periods where the counts are read); observed -10..+30 ms. Five blocks or more is audio the
# sound server never delivered: a stalling machine, not the engine.
MIC_LOSS_SKIP_MS = 50


def skip_if_microphone_lost(short_ms, out):
    """Skip, visibly and with the amount, a live run whose microphone delivered MIC_LOSS_SKIP_MS or more less than
    the cable took after the delay was fixed (the stats line's settled_mic_short_ms; None when not reported): the
    dropouts and delay shifts that follow from audio lost before the pipeline say nothing about the engine."""
    if short_ms is not None and short_ms >= MIC_LOSS_SKIP_MS:
        pytest.skip("the sound server delivered %.0f ms less microphone audio than the cable took after the delay "
                    "was fixed (a stalling machine); this run cannot judge the engine:\n%s" % (short_ms, out))


def _stop(proc, sig):
    """Ask a child to stop with sig; kill it if it has not gone within 5 s."""
    proc.send_signal(sig)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class SoundServerError(RuntimeError):
    pass


def _missing_binaries():
    return [b for b in NEEDED_BINARIES if shutil.which(b) is None]


def ensure_packages():
    """Install the Debian packages when missing. Returns None when ready, else the reason they are not."""
    missing = _missing_binaries()
    if not missing:
        return None
    if not shutil.which("apt-get"):
        return "sound-server programs missing (%s) and no apt-get to install them" % ", ".join(missing)
    if os.geteuid() != 0:
        return "sound-server programs missing (%s); run tests/install_sound_deps.sh as root" % ", ".join(missing)
    proc = subprocess.run(["bash", INSTALL_SCRIPT], capture_output=True, text=True)
    if proc.returncode != 0:
        return "installing the sound-server packages failed: %s" % (proc.stderr.strip().splitlines() or ["?"])[-1]
    missing = _missing_binaries()
    if missing:
        return "still missing after install: %s" % ", ".join(missing)
    return None


class SoundServer:
    """A running private PipeWire; .env is what a client process needs to reach it."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="denoiser-sound-")
        self.runtime_dir = os.path.join(self.root, "run")
        self.config_dir = os.path.join(self.root, "config")
        # pipewire-pulse stats run/pulse, then mkdirs it and fails on EEXIST; the pactl that polls for it
        # meanwhile creates the same folder, so it must exist before either starts.
        os.makedirs(self.runtime_dir, mode=0o700)
        os.mkdir(os.path.join(self.runtime_dir, "pulse"), mode=0o700)
        os.makedirs(os.path.join(self.config_dir, "pipewire", "pipewire.conf.d"))
        with open(os.path.join(self.config_dir, "pipewire", "pipewire.conf.d", "10-test-rate.conf"), "w") as f:
            f.write(RATE_DROP_IN)
        self.env = dict(os.environ)
        for key in ("PULSE_SERVER", "PIPEWIRE_REMOTE", "ALSA_CONFIG_PATH", "PULSE_SINK", "PULSE_SOURCE"):
            self.env.pop(key, None)
        self.env.update(
            XDG_RUNTIME_DIR=self.runtime_dir,
            XDG_CONFIG_HOME=self.config_dir,
            XDG_STATE_HOME=os.path.join(self.root, "state"),  # WirePlumber remembers defaults here
            PIPEWIRE_RUNTIME_DIR=self.runtime_dir,
            DISABLE_RTKIT="1",
        )
        self.procs = []  # (name, Popen), stopped in reverse order
        self.modules = []  # pactl module ids loaded through self.load_module, unloaded at stop
        self.dbus_pid = None

    # -- daemons ---------------------------------------------------------------------------------------------
    def _spawn(self, name, argv):
        log = open(os.path.join(self.root, name + ".log"), "wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name, lines=15):
        try:
            with open(os.path.join(self.root, name + ".log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self):
        bus = os.path.join(self.runtime_dir, "bus")
        proc = subprocess.run(
            ["dbus-daemon", "--session", "--fork", "--print-pid=1", "--address=unix:path=" + bus],
            env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if proc.returncode != 0:
            raise SoundServerError("dbus-daemon failed: " + proc.stderr.strip())
        self.dbus_pid = int(proc.stdout.split()[0])
        self.env["DBUS_SESSION_BUS_ADDRESS"] = "unix:path=" + bus
        self._spawn("pipewire", ["pipewire"])
        self._wait_for(lambda: os.path.exists(os.path.join(self.runtime_dir, "pipewire-0")), "pipewire")
        self._spawn("wireplumber", ["wireplumber"])
        self._spawn("pipewire-pulse", ["pipewire-pulse"])
        self._wait_for(lambda: self.pactl_ok("info"), "pipewire-pulse")
        # WirePlumber exits at once when it cannot work (no session bus): check it is still there and that the
        # session manager has created the fallback sink, which proves it runs the graph's policy.
        self._wait_for(lambda: "auto_null" in self.pactl("list", "short", "sinks", check=False), "wireplumber")
        return self

    def _wait_for(self, ready, what):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise SoundServerError("%s exited with code %s:\n%s" % (name, proc.returncode, self.log_tail(name)))
            if ready():
                return
            time.sleep(0.05)
        raise SoundServerError("%s did not become ready in %.0f s:\n%s" % (what, START_TIMEOUT_S, self.log_tail(what)))

    def stop(self):
        for module in reversed(self.modules):
            self.pactl("unload-module", str(module), check=False)
        self.modules = []
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                _stop(proc, signal.SIGTERM)
        self.procs = []
        if self.dbus_pid:
            try:
                os.kill(self.dbus_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.dbus_pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    # -- pactl -----------------------------------------------------------------------------------------------
    def run(self, *argv, check=True, timeout=15):
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SoundServerError("%s failed (%d): %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
        return proc.stdout

    def pactl(self, *args, check=True):
        return self.run("pactl", *args, check=check)

    def pactl_ok(self, *args):
        try:
            return subprocess.run(["pactl", *args], env=self.env, capture_output=True, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def load_module(self, name, *args, track=True):
        module = int(self.pactl("load-module", name, *args).strip())
        if track:
            self.modules.append(module)
        return module

    def unload_module(self, module):
        self.pactl("unload-module", str(module))
        if module in self.modules:
            self.modules.remove(module)

    def names(self, kind):
        """Names of the 'sinks' or 'sources' the server has now."""
        return [line.split("\t")[1] for line in self.pactl("list", "short", kind).splitlines() if "\t" in line]

    def wait_for_name(self, kind, name, present=True, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (name in self.names(kind)) == present:
                return
            time.sleep(0.05)
        raise SoundServerError("%s %r did not %s" % (kind, name, "appear" if present else "go away"))

    def make_null_sink(self, name, description, channels=1):
        """The quoting below is the one both PipeWire and PulseAudio read as a description with spaces."""
        return self.load_module(
            "module-null-sink", "sink_name=" + name, "channels=%d" % channels, "rate=%d" % GRAPH_RATE_HZ,
            "sink_properties='device.description=\"%s\"'" % description)

    def make_remap_source(self, name, master, description):
        return self.load_module(
            "module-remap-source", "source_name=" + name, "master=" + master, "channels=1", "channel_map=mono",
            "source_properties='device.description=\"%s\"'" % description)

    # -- audio in and out ------------------------------------------------------------------------------------
    def play(self, wav_path, sink):
        """paplay a file into a sink; returns the Popen (wait on it, or terminate it)."""
        return subprocess.Popen(["paplay", "--latency-msec=%d" % PA_LATENCY_MS, "--device=" + sink, wav_path],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def record(self, source, raw_path, channels=1):
        """parec float32 raw at the graph rate into raw_path; stop it with stop_recording()."""
        out = open(raw_path, "wb")
        proc = subprocess.Popen(
            ["parec", "--latency-msec=%d" % PA_LATENCY_MS, "--device=" + source, "--format=float32le",
             "--rate=%d" % GRAPH_RATE_HZ, "--channels=%d" % channels, "--raw"],
            env=self.env, stdout=out, stderr=subprocess.PIPE)
        out.close()
        proc.raw_path, proc.channels = raw_path, channels
        return proc

    @staticmethod
    def stop_recording(proc):
        _stop(proc, signal.SIGINT)
        data = np.fromfile(proc.raw_path, dtype="<f4")
        return data[: len(data) // proc.channels * proc.channels].reshape(-1, proc.channels)

    def link(self, output_port, input_port):
        """pw-link two ports (e.g. 'fake_mic_sink:monitor_MONO' -> 'probe:playback_FL')."""
        deadline = time.monotonic() + 5
        while True:
            proc = subprocess.run(["pw-link", output_port, input_port], env=self.env, capture_output=True,
                                  text=True, timeout=10)
            if proc.returncode == 0 or "File exists" in proc.stderr:
                return
            if time.monotonic() > deadline:
                raise SoundServerError("pw-link %s %s: %s" % (output_port, input_port, proc.stderr.strip()))
            time.sleep(0.1)


@pytest.fixture(scope="session")
def sound_server():
    reason = ensure_packages()
    if reason:
        pytest.skip("no sound server: " + reason)
    server = SoundServer()
    try:
        server.start()
    except (SoundServerError, OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        pytest.skip("no sound server could be started: %s" % exc)
    yield server
    server.stop()


FAKE_MIC_SINK = "fake_mic_sink"
FAKE_MIC = "fake_mic"
CABLE_SINK = "denoiser_cable"
CABLE_SOURCE = "denoised_mic"


class VirtualMic:
    """A null sink plus a remap source of its monitor: what a fake microphone and the cable both are.
    The source can be removed and brought back (a microphone unplugged and plugged in again)."""

    def __init__(self, server, sink, source, sink_description, source_description):
        self.server, self.sink, self.source = server, sink, source
        self.source_description = source_description
        self.sink_module = server.make_null_sink(sink, sink_description)
        self.source_module = None
        self.add_source()

    def add_source(self):
        self.source_module = self.server.make_remap_source(self.source, self.sink + ".monitor",
                                                           self.source_description)
        self.server.wait_for_name("sources", self.source)

    def remove_source(self):
        self.server.unload_module(self.source_module)
        self.source_module = None
        self.server.wait_for_name("sources", self.source, present=False)

    def remove(self):
        for module in (self.source_module, self.sink_module):
            if module is not None and module in self.server.modules:
                self.server.unload_module(module)
        self.source_module = self.sink_module = None


@pytest.fixture
def fake_mic(sound_server):
    """Null sink fake_mic_sink + remap source fake_mic; feed it with sound_server.play(path, FAKE_MIC_SINK)."""
    mic = VirtualMic(sound_server, FAKE_MIC_SINK, FAKE_MIC, "Fake mic sink", "Fake microphone")
    yield mic
    mic.remove()


@pytest.fixture
def cable(sound_server):
    """Null sink denoiser_cable + source denoised_mic, as start_pipeline.sh makes them."""
    pair = VirtualMic(sound_server, CABLE_SINK, CABLE_SOURCE, "Denoiser cable", "Denoised microphone")
    yield pair
    pair.remove()


@pytest.fixture
def probe(sound_server, fake_mic, cable, tmp_path):
    """A stereo recorder of what the microphone delivers (left) and what reaches the cable (right).

    Both channels come from one parec stream of one null sink, so they are sample-synchronous: the lag
    between them is the true microphone-to-cable latency."""
    module = sound_server.make_null_sink("probe", "Test probe", channels=2)
    sound_server.link(FAKE_MIC_SINK + ":monitor_MONO", "probe:playback_FL")
    sound_server.link(CABLE_SINK + ":monitor_MONO", "probe:playback_FR")
    recorder = sound_server.record("probe.monitor", str(tmp_path / "probe.raw"), channels=2)
    yield recorder
    if recorder.poll() is None:
        SoundServer.stop_recording(recorder)
    sound_server.unload_module(module)
