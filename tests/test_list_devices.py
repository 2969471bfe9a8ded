"""list_devices.py against a real sound server (tests/sound_server.py), and without one."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sound_server import FAKE_MIC  # noqa: E402


def list_devices(env, *args):
    return subprocess.run([sys.executable, str(REPO / "list_devices.py"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def rows(stdout):
    """{name: row fields} for the device table."""
    table = {}
    for line in stdout.splitlines()[1:]:
        if not line[:3].strip().isdigit():
            break
        index, hostapi, ins, outs, rate, in16k, out16k = line[:5], line[7:21], *line[22:].split()[:5]
        rest = line[22:].split(None, 5)[5] if len(line[22:].split(None, 5)) > 5 else ""
        virtual = rest.startswith("virtual ")
        name = rest[len("virtual "):] if virtual else rest
        table[name.strip()] = {"index": int(index.strip().rstrip("<>")), "hostapi": hostapi.strip(),
                               "in": int(ins), "out": int(outs), "rate": int(rate), "in16k": in16k,
                               "out16k": out16k, "virtual": virtual}
    return table


def test_lists_server_devices_with_16k_check_and_cable_marks(sound_server, fake_mic, cable, tmp_path):
    conf = tmp_path / "pinned.conf"
    conf.write_text('pcm.mic48k { type asym capture.pcm { type pipewire capture_node "%s" rate 48000 } }\n'
                    % FAKE_MIC)
    env = dict(sound_server.env, ALSA_CONFIG_PATH="/usr/share/alsa/alsa.conf:%s" % conf)
    proc = list_devices(env)
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    mic = table["fake_mic (Fake microphone)"]
    assert mic["in"] > 0 and mic["out"] == 0 and mic["in16k"] == "yes" and mic["hostapi"] == "ALSA"
    assert not mic["virtual"]
    cab = table["denoiser_cable (Denoiser cable)"]
    assert cab["out"] > 0 and cab["in"] == 0 and cab["out16k"] == "yes" and cab["virtual"]
    assert table["denoised_mic (Denoised microphone)"]["virtual"]
    pinned = table["mic48k"]
    assert pinned["in16k"] == "no" and pinned["rate"] == 48000, "a device that refuses 16 kHz says so"
    assert "cable: %d denoiser_cable (Denoiser cable)" % cab["index"] in proc.stdout


def test_shows_what_mic_and_cable_flags_pick(sound_server, fake_mic, cable):
    proc = list_devices(sound_server.env, "--mic", "Fake microphone", "--cable", "nothing-like-this")
    assert proc.returncode == 0, proc.stderr
    index = rows(proc.stdout)["fake_mic (Fake microphone)"]["index"]
    assert "microphone: %d fake_mic (Fake microphone)" % index in proc.stdout
    assert "cable: not found: no output device matches 'nothing-like-this'" in proc.stdout


def test_without_a_sound_server_says_what_to_install(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("PULSE_SERVER", "ALSA_CONFIG_PATH")}
    env.update(XDG_RUNTIME_DIR=str(empty), DBUS_SESSION_BUS_ADDRESS="unix:path=%s/none" % empty)
    proc = list_devices(env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("index")
    assert "cable: not found: no output device matches 'denoiser_cable'" in proc.stdout
    assert "start_pipeline.sh" in proc.stdout


def test_unknown_flag_is_an_error():
    proc = list_devices(dict(os.environ), "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
