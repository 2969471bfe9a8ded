"""Sound devices for both pipelines: the Linux sound server's virtual devices, device lookup by index or name,
and the listing that list_devices.py prints.

Devices: MIC / CABLE (in the pipeline scripts, or --mic / --cable) take an index or part of a name. The default
cable is VB-Audio "CABLE Input" on Windows, "BlackHole" on macOS and the project's own "denoiser_cable" on Linux
(start_pipeline.sh creates it; apps then pick "Denoised microphone"). On Linux the virtual devices live in the sound
server (PipeWire or PulseAudio) while Debian's PortAudio only speaks ALSA, so this module writes ALSA pcm
definitions for the server's sinks and sources to a file of its own and loads it with ALSA_CONFIG_PATH before
sounddevice is imported. /etc and ~/.asoundrc are never touched. live_audio.py streams through what it finds.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

from dsp import SAMPLE_RATE

DEFAULT_CABLE = {"win32": "CABLE Input", "darwin": "BlackHole", "linux": "denoiser_cable"}
LINUX_CABLE_SINK = "denoiser_cable"  # null sink the pipeline writes into (start_pipeline.sh creates it)
LINUX_CABLE_SOURCE = "denoised_mic"  # remap of its monitor that apps see as "Denoised microphone"
# Host APIs in order of preference when one device appears under several (Windows lists each device once per
# API; MME cuts names to 31 characters and adds its own resampler, WASAPI is the modern path).
HOSTAPI_PREFERENCE = ("Windows WASAPI", "Core Audio", "ALSA", "JACK Audio Connection Kit",
                      "Windows DirectSound", "MME", "Windows WDM-KS", "OSS")
VIRTUAL_WORDS = ("cable", "blackhole", "loopback", "soundflower", "voicemeeter", "vb-audio", "virtual",
                 "null", "monitor", "denoise")  # names that look like virtual cables in the device listing
ALSA_BASE_CONFIG = "/usr/share/alsa/alsa.conf"

INSTALL_HINTS = {
    "win32": "Install VB-Audio Virtual Cable (https://vb-audio.com/Cable/) and reboot; the pipeline writes to "
             "'CABLE Input' and Zoom/Teams pick 'CABLE Output' as their microphone.",
    "darwin": "Install BlackHole 2ch (`brew install blackhole-2ch`, or https://existential.audio/blackhole/); the "
              "pipeline writes to it and Zoom/Teams pick 'BlackHole 2ch' as their microphone.",
    "linux": "Run ./start_pipeline.sh, which creates the cable, or create it by hand:\n"
             "    pactl load-module module-null-sink sink_name=denoiser_cable channels=1 "
             "sink_properties='device.description=\"Denoiser cable\"'\n"
             "    pactl load-module module-remap-source source_name=denoised_mic master=denoiser_cable.monitor "
             "channels=1 source_properties='device.description=\"Denoised microphone\"'\n"
             "  It needs pactl (apt install pulseaudio-utils) and, for PortAudio to reach it, pipewire-alsa "
             "(PipeWire) or libasound2-plugins (PulseAudio).",
}



class DeviceError(Exception):
    """A device problem the user can fix; str() is a one-line message, .details the listing that helps."""

    def __init__(self, message, details=""):
        super().__init__(message)
        self.details = details


def _platform():
    if sys.platform.startswith("linux"):
        return "linux"
    return sys.platform if sys.platform in ("win32", "darwin") else "other"


# --------------------------------------------------------------------------------------------------------------
# Linux: reach the sound server's sinks and sources through ALSA pcm definitions
# --------------------------------------------------------------------------------------------------------------
_ALSA_NAMES = {}  # ALSA pcm id written by us -> (server node name, description), for lookup and listing
_SERVER = {}  # facts from pactl: server name, default source


def _pactl(*args):
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=5, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _pactl_nodes(kind):
    """[(name, description)] of the server's 'sinks' or 'sources' from `pactl list`, or None without a server."""
    text = _pactl("list", kind)
    if text is None:
        return None
    nodes, name = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Name: "):
            name = line[6:]
        elif line.startswith("Description: ") and name is not None:
            nodes.append((name, line[13:]))
            name = None
    return nodes


def _alsa_plugin_available(plugin):
    patterns = ("/usr/lib/*/alsa-lib/libasound_module_pcm_%s.so", "/usr/lib64/alsa-lib/libasound_module_pcm_%s.so",
                "/usr/lib/alsa-lib/libasound_module_pcm_%s.so")
    return any(glob.glob(p % plugin) for p in patterns)


def _alsa_id(name, taken):
    """An ALSA pcm id for a server node name: ALSA splits ids at dots, so anything but [A-Za-z0-9_] becomes _."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if ident in ("default", "sysdefault", "pulse", "pipewire", "null", "hw", "plughw", "jack", "dmix", "dsnoop"):
        ident = "server_" + ident
    base, n = ident, 2
    while ident in taken:
        ident, n = "%s_%d" % (base, n), n + 1
    taken.add(ident)
    return ident


def _alsa_config_text(plugin, sinks, sources):
    def quote(text):
        return '"%s"' % text.replace("\\", "").replace('"', "'")

    target = {"pipewire": ("playback_node", "capture_node"), "pulse": ("device", "device")}[plugin]
    lines = ["# Written by live_audio.py on each start: the sound server's sinks and sources as ALSA pcms.",
             "# Loaded only by this project's processes through ALSA_CONFIG_PATH; safe to delete."]
    taken, names = set(), {}
    for direction, nodes, key in (("playback", sinks, target[0]), ("capture", sources, target[1])):
        for name, description in nodes:
            ident = _alsa_id(name, taken)
            names[ident] = (name, description)
            lines.append("pcm.%s { type asym %s.pcm { type %s %s %s } hint { show on description %s } }"
                         % (ident, direction, plugin, key, quote(name), quote(description)))
    return "\n".join(lines) + "\n", names


def _alsa_config_path():
    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(folder, "denoiser-alsa-%d.conf" % uid)


def prepare_linux_audio():
    """Write the ALSA definitions for the server's current sinks/sources and point ALSA_CONFIG_PATH at them.

    Must run before PortAudio initialises (sounddevice import, or a re-scan). A no-op off Linux or without a
    PulseAudio-compatible server; then only ALSA's own devices are visible.
    """
    _ALSA_NAMES.clear()
    _SERVER.clear()
    if _platform() != "linux" or not os.path.exists(ALSA_BASE_CONFIG):
        return
    info = _pactl("info")
    sinks, sources = _pactl_nodes("sinks"), _pactl_nodes("sources")
    if info is None or sinks is None or sources is None:
        return
    for line in info.splitlines():
        key, _, value = line.partition(":")
        _SERVER[key.strip()] = value.strip()
    on_pipewire = "PipeWire" in _SERVER.get("Server Name", "")
    if on_pipewire and _alsa_plugin_available("pipewire"):
        plugin = "pipewire"
        # A stream whose device vanished must fail (so it is reported and retried), not be moved silently to
        # another microphone or to the speakers.
        os.environ["PIPEWIRE_PROPS"] = "{ node.dont-reconnect = true }"
    elif _alsa_plugin_available("pulse"):
        plugin = "pulse"
    else:
        _SERVER["missing_plugin"] = "pipewire-alsa" if on_pipewire else "libasound2-plugins"
        return
    text, names = _alsa_config_text(plugin, sinks, sources)
    path = _alsa_config_path()
    tmp = path + ".%d.tmp" % os.getpid()
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        _SERVER["missing_plugin"] = "nothing: %s is not writable (%s)" % (path, exc.strerror)
        return
    _ALSA_NAMES.update(names)
    current = os.environ.get("ALSA_CONFIG_PATH")
    if not current:
        os.environ["ALSA_CONFIG_PATH"] = ALSA_BASE_CONFIG + ":" + path
    elif path not in current.split(":"):
        os.environ["ALSA_CONFIG_PATH"] = current + ":" + path


_SD = None


def sounddevice_module():
    """Import sounddevice (after the Linux ALSA set-up); DeviceError when PortAudio is missing."""
    global _SD
    if _SD is None:
        prepare_linux_audio()
        try:
            import sounddevice
        except ImportError:
            raise DeviceError("the sounddevice package is missing: pip install -r requirements.txt")
        except OSError as exc:  # the PortAudio library itself is missing
            raise DeviceError("PortAudio is not installed (%s); on Debian/Ubuntu: apt install libportaudio2" % exc)
        _SD = sounddevice
    return _SD


def rescan_devices():
    """Let PortAudio see devices that appeared or vanished since it started (no stream may be open)."""
    sd = sounddevice_module()
    prepare_linux_audio()
    sd._terminate()
    sd._initialize()


# --------------------------------------------------------------------------------------------------------------
# Device lookup and listing
# --------------------------------------------------------------------------------------------------------------
def parse_device_spec(value):
    """None/'' -> None (system default), '3' or 3 -> 3 (index), anything else -> name substring."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    value = str(value).strip()
    if not value:
        return None
    return int(value) if value.isdigit() else value


def channels_key(kind):
    return "max_input_channels" if kind == "input" else "max_output_channels"


def _hostapi_name(device, hostapis):
    return hostapis[device["hostapi"]]["name"]


def _hostapi_rank(device, hostapis):
    name = _hostapi_name(device, hostapis)
    return HOSTAPI_PREFERENCE.index(name) if name in HOSTAPI_PREFERENCE else len(HOSTAPI_PREFERENCE)


def describe_device(device, hostapis):
    """'name (server description)' on Linux for the server's nodes, else the PortAudio name."""
    extra = _ALSA_NAMES.get(device["name"])
    name = device["name"] if not extra else "%s (%s)" % (device["name"], extra[1])
    return name


def _listing(devices, hostapis, kind, only=None):
    key = channels_key(kind)
    rows = [d for d in devices if d[key] > 0 and (only is None or d in only)]
    if not rows:
        return "  (no %s devices at all)" % kind
    return "\n".join("  %3d  %s  [%s]" % (d["index"], describe_device(d, hostapis), _hostapi_name(d, hostapis))
                     for d in rows)


def find_device(spec, kind, devices, hostapis, default_index=-1, hint=""):
    """Index of the `kind` ('input'/'output') device named by spec (index, name substring or None = default).

    A name may match one device under several host APIs (Windows): the preferred API wins. Ambiguous or
    missing names raise DeviceError whose details list the candidates.
    """
    key = channels_key(kind)
    devices = [dict(d, index=i) for i, d in enumerate(devices)]
    if spec is None:
        if 0 <= default_index < len(devices) and devices[default_index][key] > 0:
            return default_index
        raise DeviceError("there is no default %s device" % kind,
                          "%s devices:\n%s" % (kind, _listing(devices, hostapis, kind)))
    if isinstance(spec, int):
        if 0 <= spec < len(devices) and devices[spec][key] > 0:
            return spec
        what = "is not an %s device" % kind if 0 <= spec < len(devices) else "does not exist"
        raise DeviceError("device %d %s" % (spec, what),
                          "%s devices:\n%s" % (kind, _listing(devices, hostapis, kind)))
    needle = spec.lower()

    def names(d):
        extra = _ALSA_NAMES.get(d["name"])
        return [d["name"].lower()] + ([extra[0].lower(), extra[1].lower()] if extra else [])

    matches = [d for d in devices if d[key] > 0 and any(needle in n for n in names(d))]
    if not matches:
        details = "%s devices:\n%s" % (kind, _listing(devices, hostapis, kind))
        raise DeviceError("no %s device matches '%s'" % (kind, spec), details + ("\n" + hint if hint else ""))
    exact = [d for d in matches if needle in names(d)]
    candidates = exact or matches  # a full name beats longer names that contain it
    best = min(_hostapi_rank(d, hostapis) for d in candidates)
    preferred = [d for d in candidates if _hostapi_rank(d, hostapis) == best]
    if len(preferred) == 1:
        return preferred[0]["index"]
    raise DeviceError("'%s' matches %d %s devices; give the index or more of the name" % (spec, len(preferred), kind),
                      "matching %s devices:\n%s" % (kind, _listing(devices, hostapis, kind, preferred)))


def default_cable_name():
    return DEFAULT_CABLE.get(_platform())


def resolve(spec, kind):
    """find_device() on the devices PortAudio sees now; spec None for the cable means the platform's cable."""
    sd = sounddevice_module()
    devices, hostapis = list(sd.query_devices()), list(sd.query_hostapis())
    default = sd.default.device[0 if kind == "input" else 1]
    hint = ""
    if kind == "output" and spec is None:
        spec = default_cable_name()
        hint = INSTALL_HINTS.get(_platform(), "")
        if spec is None:
            raise DeviceError("no virtual cable is known on this platform; pass --cable NAME",
                              "output devices:\n" + _listing([dict(d, index=i) for i, d in enumerate(devices)],
                                                             hostapis, "output"))
    if _SERVER.get("missing_plugin"):
        hint += ("\n" if hint else "") + ("The sound server's devices are invisible to PortAudio: install %s."
                                          % _SERVER["missing_plugin"])
    return find_device(spec, kind, devices, hostapis, default, hint)


def looks_virtual(name):
    lower = name.lower()
    return any(word in lower for word in VIRTUAL_WORDS)


def settings_ok(sd, kind, index, rate, channels=1):
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=index, channels=channels, samplerate=rate, dtype="float32",
              extra_settings=extra_settings(sd, index))
        return True
    except Exception:  # PortAudio answers with several exception types; any means "will not open"
        return False


def device_rows():
    """One dict per device for list_devices.py and --list."""
    sd = sounddevice_module()
    hostapis = list(sd.query_hostapis())
    rows = []
    for index, d in enumerate(sd.query_devices()):
        d = dict(d, index=index)
        rows.append({
            "index": index,
            "name": describe_device(d, hostapis),
            "hostapi": _hostapi_name(d, hostapis),
            "inputs": d["max_input_channels"],
            "outputs": d["max_output_channels"],
            "rate": int(d["default_samplerate"]),
            "in16k": d["max_input_channels"] > 0 and settings_ok(sd, "input", index, SAMPLE_RATE),
            "out16k": d["max_output_channels"] > 0 and settings_ok(sd, "output", index, SAMPLE_RATE),
            "virtual": looks_virtual(describe_device(d, hostapis)),
            "default_in": index == sd.default.device[0],
            "default_out": index == sd.default.device[1],
        })
    return rows


def print_devices(mic=None, cable=None, out=None):
    """The device table, then which devices --mic/--cable would pick. Returns an exit code."""
    out = out or sys.stdout
    try:
        rows = device_rows()
    except DeviceError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1

    def yes(flag):
        return "yes" if flag else "no"

    print("%5s  %-14s %3s %3s %6s  %-9s %-10s %-7s %s" % ("index", "host API", "in", "out", "rate", "16k in",
                                                         "16k out", "cable?", "name"), file=out)
    for r in rows:
        mark = ("<" if r["default_in"] else " ") + (">" if r["default_out"] else " ")
        print("%3d%s  %-14s %3d %3d %6d  %-9s %-10s %-7s %s" % (
            r["index"], mark, r["hostapi"][:14], r["inputs"], r["outputs"], r["rate"],
            yes(r["in16k"]) if r["inputs"] else "-", yes(r["out16k"]) if r["outputs"] else "-",
            "virtual" if r["virtual"] else "", r["name"]), file=out)
    print("(< default input, > default output; '16k' = opens as 16 kHz mono, else it is resampled)", file=out)
    for kind, spec, label in (("input", mic, "microphone"), ("output", cable, "cable")):
        try:
            index = resolve(spec, kind)
            print("%s: %d %s" % (label, index, rows[index]["name"]), file=out)
        except DeviceError as exc:
            print("%s: not found: %s" % (label, exc), file=out)
            if kind == "output" and spec is None:
                print("  " + INSTALL_HINTS.get(_platform(), ""), file=out)
    return 0


def device_identity(index):
    sd = sounddevice_module()
    d = sd.query_devices(index)
    return d["name"], sd.query_hostapis(d["hostapi"])["name"]


def find_again(identity, kind, was_default):
    """Index of the same device after a re-scan, or None while it is still missing."""
    sd = sounddevice_module()
    if was_default:
        index = sd.default.device[0 if kind == "input" else 1]
        return index if index >= 0 else None
    for index, d in enumerate(sd.query_devices()):
        if d["name"] == identity[0] and sd.query_hostapis(d["hostapi"])["name"] == identity[1] \
                and d[channels_key(kind)] > 0:
            return index
    return None


def check_not_own_output(mic_index, cable_index):
    """Refuse to listen to our own cable (the default microphone may be 'Denoised microphone')."""
    if mic_index == cable_index:
        raise DeviceError("the microphone and the cable are the same device (%d)" % mic_index)
    if _platform() != "linux":
        return
    name = sounddevice_module().query_devices(mic_index)["name"]
    node = _ALSA_NAMES.get(name, (name, ""))[0]
    own = (LINUX_CABLE_SOURCE, LINUX_CABLE_SINK + ".monitor")
    if name == "default" and _SERVER.get("Default Source") in own:
        raise DeviceError("the system's default microphone is '%s', this pipeline's own output; pass --mic with "
                          "your real microphone (see --list)" % _SERVER["Default Source"])
    if node in own:
        raise DeviceError("--mic '%s' is this pipeline's own output; pick your real microphone (see --list)" % node)


def extra_settings(sd, index):
    """WASAPI shared mode refuses rates and channel counts other than the mixer's unless asked to convert."""
    try:
        hostapi = sd.query_hostapis(sd.query_devices(index)["hostapi"])["name"]
    except Exception:
        return None
    if hostapi == "Windows WASAPI":
        try:
            return sd.WasapiSettings(auto_convert=True)
        except TypeError:  # sounddevice older than 0.4.7
            return None
    return None


# --------------------------------------------------------------------------------------------------------------
# Linux: is any application recording from the cable?
# --------------------------------------------------------------------------------------------------------------
def server_sink_of(cable_index):
    """The sound server's sink name behind a PortAudio output device, or None off Linux or for a plain ALSA one."""
    if _platform() != "linux":
        return None
    name = sounddevice_module().query_devices(cable_index)["name"]
    return _ALSA_NAMES.get(name, (None, ""))[0]


def recorders(sink, text_sources, text_outputs, extra=(LINUX_CABLE_SOURCE,)):
    """Applications recording from sink's monitor or a source remapped from it (extra, by name), from the
    `pactl list short sources` and `pactl list short source-outputs` texts. A remap's own capture has no client
    ("-"): it runs whether or not anyone listens, so it does not count."""
    watched = set()
    for line in text_sources.splitlines():
        cols = line.split("\t")
        if len(cols) > 1 and (cols[1] == sink + ".monitor" or cols[1] in extra):
            watched.add(cols[0])
    count = 0
    for line in text_outputs.splitlines():
        cols = line.split("\t")
        if len(cols) > 2 and cols[1] in watched and cols[2] != "-":
            count += 1
    return count


class ListenerWatch:
    """Follows whether any application records from the cable, for the pipelines' idle mode. `pactl subscribe`
    reports every stream that comes or goes the moment it does, so nothing is polled: while no app listens, the
    process sleeps. listening is True until the first check says otherwise; changed is set on every change."""

    def __init__(self, sink):
        import threading
        self.sink, self.listening, self.changed = sink, True, threading.Event()
        self._proc = None
        self._thread = threading.Thread(target=self._follow, name="denoiser-listeners", daemon=True)

    @classmethod
    def start(cls, cable_index):
        """A running watch for the cable, or None where there is nothing to watch (not Linux, not a server sink,
        no pactl)."""
        sink = server_sink_of(cable_index)
        if sink is None or _pactl("info") is None:
            return None
        watch = cls(sink)
        try:
            watch._proc = subprocess.Popen(["pactl", "subscribe"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True, env=dict(os.environ, LC_ALL="C"))
        except OSError:
            return None
        watch.check()
        watch._thread.start()
        return watch

    def check(self):
        sources, outputs = _pactl("list", "short", "sources"), _pactl("list", "short", "source-outputs")
        if sources is None or outputs is None:
            return  # the server is busy or restarting: keep the last answer
        listening = recorders(self.sink, sources, outputs) > 0
        if listening != self.listening:
            self.listening = listening
            self.changed.set()

    def _follow(self):
        for line in self._proc.stdout:
            if "source-output" in line:
                self.check()
        self.listening = True  # pactl ended (server gone): never leave the pipeline idle on a stale answer
        self.changed.set()

    def stop(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
