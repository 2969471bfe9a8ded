"""start_pipeline.sh: verbs, first-run set-up, one instance at a time through its PID file, and the Linux
virtual microphone (created once, given back on stop, defaults left alone) on a real sound server.

The launcher is copied into a temporary folder beside stand-in pipeline scripts that report how they were
started and wait for a signal, so these tests exercise the launcher itself and run in seconds.
(start_pipeline.bat is the Windows twin; it cannot run here.)
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sound_server import FAKE_MIC, FAKE_MIC_SINK  # noqa: E402

STUB = '''
import os, signal, sys, time
name = os.path.basename(sys.argv[0]).split("_")[0]
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
signal.signal(signal.SIGUSR1, lambda signum, frame: print("%s got SIGUSR1" % name, flush=True))
print("%s started pid=%d args=%s" % (name, os.getpid(), " ".join(sys.argv[1:])), flush=True)
while not stop:
    time.sleep(0.02)
print("%s stopped by signal %d" % (name, stop[0]), flush=True)
'''
LIST_STUB = 'import sys\nprint("list args=%s" % " ".join(sys.argv[1:]))\n'


@pytest.fixture
def launcher(tmp_path):
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy(REPO / "start_pipeline.sh", folder / "start_pipeline.sh")
    (folder / "ml_denoiser_pipeline.py").write_text(STUB)
    (folder / "dsp_filter_pipeline.py").write_text(STUB)
    (folder / "list_devices.py").write_text(LIST_STUB)
    (folder / "requirements.txt").write_text("# nothing to install for the stand-ins\n")
    return folder


def _env(extra=None, python=True):
    env = dict(os.environ)
    env.pop("DENOISER_PYTHON", None)
    if python:
        env["DENOISER_PYTHON"] = sys.executable
    env.update(extra or {})
    return env


def run(folder, *args, env=None, timeout=120):
    return subprocess.run(["bash", str(folder / "start_pipeline.sh"), *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


class Running:
    """A launcher started in its own process group, as a terminal runs it."""

    def __init__(self, folder, *args, env=None):
        self.log = folder / ("run-%d.log" % time.monotonic_ns())
        self.file = open(self.log, "w")
        self.proc = subprocess.Popen(["bash", str(folder / "start_pipeline.sh"), *args], env=env or _env(),
                                     stdout=self.file, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self):
        return self.log.read_text()

    def wait_for(self, needle, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.proc.poll() is not None and needle not in self.text():
                break
            time.sleep(0.05)
        raise AssertionError("no %r from the launcher (exit %s):\n%s" % (needle, self.proc.poll(), self.text()))

    def ctrl_c(self):
        """SIGINT to the whole foreground group, as the terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.finish()

    def finish(self, timeout=20):
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.file.close()
        return code


def test_verbs_pick_the_script(launcher):
    listed = run(launcher, "list", "--extra", "1")
    assert listed.returncode == 0 and listed.stdout.strip() == "list args=--extra 1"
    bad = run(launcher, "x")
    assert bad.returncode != 0
    assert bad.stderr.strip() == ("error: unknown verb 'x': use nothing (ML pipeline), 'fast' (low latency), "
                                  "'b' (DSP pipeline), "
                                  "'list', 'install', 'uninstall', 'status' or 'ab'")
    for args, name in (((), "ml"), (("b",), "dsp"), (("--mic", "USB"), "ml"), (("fast", "--mic", "USB"), "ml")):
        running = Running(launcher, *args)
        running.wait_for("%s started" % name)
        assert running.ctrl_c() == 0
        text = running.text()
        assert "%s stopped by signal %d" % (name, signal.SIGTERM) in text
        if args and args[0] == "--mic":
            assert "args=--mic USB" in text
        if args and args[0] == "fast":
            assert "args=--low-latency --mic USB" in text
    assert not (launcher / ".cache" / "pipeline.pid").exists(), "the PID file goes when the instance stops"


def test_second_start_stops_the_first_through_its_pid_file(launcher):
    first = Running(launcher)
    first.wait_for("ml started")
    pid_file = launcher / ".cache" / "pipeline.pid"
    launcher_pid, child_pid = map(int, pid_file.read_text().split())
    assert launcher_pid == first.proc.pid
    assert "pid=%d" % child_pid in first.text()

    second = Running(launcher, "b", "--keep-devices")
    second.wait_for("dsp started")
    assert first.finish(10) == 0, "the first instance must have been stopped"
    assert "ml stopped by signal %d" % signal.SIGTERM in first.text()
    assert "stopping the previous instance (PID %d)" % launcher_pid in second.text()
    assert int(pid_file.read_text().split()[0]) == second.proc.pid
    assert "args=\n" in second.text() or second.text().rstrip().endswith("args="), "--keep-devices is the launcher's"
    assert second.ctrl_c() == 0


def test_stale_pid_file_never_kills_another_program(launcher):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (launcher / ".cache").mkdir()
        (launcher / ".cache" / "pipeline.pid").write_text("%d %d\n" % (bystander.pid, bystander.pid))
        running = Running(launcher)
        running.wait_for("ml started")
        assert bystander.poll() is None, "a PID that is not a launcher must be left alone"
        assert "stopping the previous instance" not in running.text()
        assert running.ctrl_c() == 0
    finally:
        bystander.kill()
        bystander.wait()


def test_first_run_creates_the_environment_once(launcher):
    env = _env(python=False)
    first = run(launcher, "list", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "first run: creating .venv" in first.stdout
    assert first.stdout.strip().endswith("list args=")
    assert (launcher / ".venv" / "bin" / "python").exists()
    assert (launcher / ".venv" / "requirements.installed").read_text() == (launcher / "requirements.txt").read_text()
    again = run(launcher, "list", env=env)
    assert again.returncode == 0 and "first run" not in again.stdout
    (launcher / "requirements.txt").write_text("# changed requirements are installed again\n")
    changed = run(launcher, "list", env=env)
    assert changed.returncode == 0 and "first run" in changed.stdout


# ---------------------------------------------------------------------------------------------------------------
# Linux virtual microphone, on a real PipeWire
# ---------------------------------------------------------------------------------------------------------------
def _count(server, kind, name):
    return server.names(kind).count(name)


def _description(server, name):
    text = server.pactl("list", "sources")
    block = text.split("Name: %s\n" % name, 1)[1]
    return block.split("Description: ", 1)[1].splitlines()[0]


def _defaults(server):
    info = server.pactl("info")
    pick = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in info.splitlines() if ": " in line}
    return pick["Default Sink"], pick["Default Source"]


def test_virtual_microphone_is_made_once_and_removed_on_stop(launcher, sound_server, fake_mic):
    env = _env(dict(sound_server.env))
    env["DENOISER_PYTHON"] = sys.executable
    # A user's chosen defaults to protect. Set, not left to WirePlumber: right after the fake microphone appears it
    # may still name the sink's monitor as the default source (one fresh-clone run saw that).
    sound_server.pactl("set-default-sink", FAKE_MIC_SINK)
    sound_server.pactl("set-default-source", FAKE_MIC)
    deadline = time.monotonic() + 5
    while _defaults(sound_server) != (FAKE_MIC_SINK, FAKE_MIC) and time.monotonic() < deadline:
        time.sleep(0.1)
    server_defaults = _defaults(sound_server)
    assert server_defaults == (FAKE_MIC_SINK, FAKE_MIC), "the test needs real defaults to protect"

    kept = Running(launcher, "--keep-devices", env=env)
    kept.wait_for("ml started")
    assert kept.text().count('pick "Denoised microphone" as the microphone') == 1, kept.text()
    assert "noise suppression off" in kept.text()
    assert _count(sound_server, "sinks", "denoiser_cable") == 1
    assert _count(sound_server, "sources", "denoised_mic") == 1
    assert _description(sound_server, "denoised_mic") == "Denoised microphone"
    assert _defaults(sound_server) == server_defaults, "the cable must not become the system default"
    assert kept.ctrl_c() == 0
    assert _count(sound_server, "sources", "denoised_mic") == 1, "--keep-devices leaves them in place"

    again = Running(launcher, "b", env=env)  # the devices exist already: nothing is doubled
    again.wait_for("dsp started")
    assert "first run" not in again.text(), "the advice is given once"
    assert _count(sound_server, "sinks", "denoiser_cable") == 1
    assert _count(sound_server, "sources", "denoised_mic") == 1
    assert again.ctrl_c() == 0
    assert _count(sound_server, "sinks", "denoiser_cable") == 0
    assert _count(sound_server, "sources", "denoised_mic") == 0
    modules = sound_server.pactl("list", "short", "modules")
    assert "denoiser_cable" not in modules and "denoised_mic" not in modules


def test_ab_toggles_bypass_in_the_running_pipeline(launcher):
    missing = run(launcher, "ab")
    assert missing.returncode == 1 and "no pipeline is running" in missing.stderr
    running = Running(launcher)
    running.wait_for("ml started")
    done = run(launcher, "ab")
    assert done.returncode == 0 and "toggled bypass" in done.stdout
    running.wait_for("ml got SIGUSR1")
    assert running.ctrl_c() == 0
