"""Start the live noise suppressor with the desktop session: install, uninstall, status.

    ./start_pipeline.sh install [pipeline flags]   # Linux: a systemd user unit; macOS: a LaunchAgent
    ./start_pipeline.sh uninstall
    ./start_pipeline.sh status
    start_pipeline.bat install [pipeline flags]    # Windows: a launcher in the user's Startup folder

The launchers call this file; it writes one small file that runs the launcher again at login with the flags given
(and --quiet: a log has no use for a status line redrawn twice a second), then tells the session manager.
Linux: $XDG_CONFIG_HOME/systemd/user/UNIT_NAME (default ~/.config/systemd/user), ordered after the sound server's
user services (PipeWire with WirePlumber, or PulseAudio), restarted on failure, logging to the journal
(`journalctl --user -u denoiser`). macOS: ~/Library/LaunchAgents/LAUNCH_AGENT.plist, restarted on failure, logging
to ~/Library/Logs/denoiser.log. Windows: a .cmd in the Startup folder that starts the launcher minimised.
Installing twice rewrites the same file; uninstalling what is not installed says so and succeeds.
"""
import ntpath
import os
import posixpath
import shlex
import subprocess
import sys
from pathlib import Path

UNIT_NAME = "denoiser.service"              # Linux: the systemd user unit's file name
LAUNCH_AGENT = "org.denoiser.pipeline"      # macOS: the LaunchAgent's label and file name
STARTUP_NAME = "Denoiser.cmd"               # Windows: the file in the Startup folder
SYSTEMCTL = os.environ.get("DENOISER_SYSTEMCTL", "systemctl")  # the systemctl to call (env DENOISER_SYSTEMCTL)
LAUNCHCTL = os.environ.get("DENOISER_LAUNCHCTL", "launchctl")  # the launchctl to call (env DENOISER_LAUNCHCTL)
RESTART_SEC = 3                             # seconds systemd waits before restarting a failed pipeline
# The sound server's user services; "After=" orders without requiring, so whichever of them exists is waited for.
SOUND_SERVICES = "pipewire.service pipewire-pulse.service wireplumber.service pulseaudio.service"


class AutostartError(Exception):
    pass


def platform_name():
    """linux, darwin or win32; DENOISER_PLATFORM overrides it (to write another system's file, as the tests do)."""
    name = os.environ.get("DENOISER_PLATFORM", sys.platform)
    return "linux" if name.startswith("linux") else name


def unit_path():
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / UNIT_NAME


def agent_path():
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT}.plist"


def startup_path():
    appdata = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
    return Path(appdata) / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup" / STARTUP_NAME


def command(launcher, flags):
    """The launcher (an absolute path: the launchers pass their own) and its flags, with --quiet."""
    return [str(launcher), *flags, *([] if "--quiet" in flags else ["--quiet"])]


def folder_of(launcher):
    return (ntpath if platform_name() == "win32" else posixpath).dirname(str(launcher))


def systemd_quote(arg):
    """One ExecStart= word: systemd splits on spaces and reads quotes and backslashes, and % starts a specifier."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in " \t\"'\\;$"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(launcher, flags):
    cmd = command(launcher, flags)
    return "\n".join([
        "[Unit]",
        "Description=Noise suppressor: microphone -> denoiser -> \"Denoised microphone\"",
        f"After={SOUND_SERVICES}",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={folder_of(cmd[0]).replace('%', '%%')}",  # the rest of the line, spaces and all
        "ExecStart=" + " ".join(systemd_quote(a) for a in cmd),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def launch_agent(launcher, flags):
    cmd = command(launcher, flags)
    log = xml_escape(str(Path.home() / "Library" / "Logs" / "denoiser.log"))
    args = "\n".join(f"    <string>{xml_escape(a)}</string>" for a in cmd)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LAUNCH_AGENT}</string>
  <key>ProgramArguments</key>
  <array>
{args}
  </array>
  <key>WorkingDirectory</key>
  <string>{xml_escape(folder_of(cmd[0]))}</string>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>StandardOutPath</key>
  <string>{log}</string>
  <key>StandardErrorPath</key>
  <string>{log}</string>
</dict>
</plist>
"""


def cmd_quote(arg):
    """One cmd.exe word: quoted when it holds a space or a character cmd would act on."""
    return f'"{arg}"' if not arg or any(c in arg for c in ' &|<>^()%!"') else arg


def windows_startup(launcher, flags):
    cmd = command(launcher, flags)
    # start /min: the console opens minimised at login, where closing it stops the pipeline as Ctrl+C would.
    return "\r\n".join(["@echo off", "rem Starts the noise suppressor at login (start_pipeline.bat install).",
                        f'cd /d {cmd_quote(ntpath.dirname(cmd[0]))}',
                        'start "Denoiser" /min cmd /c ' + " ".join(cmd_quote(a) for a in cmd), ""])


def write_atomically(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def run(tool, *args):
    """(return code, first line of output) of tool args; 127 when the tool is not there."""
    try:
        done = subprocess.run([*shlex.split(tool), *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return 127, f"{tool} not found"
    except subprocess.TimeoutExpired:
        return 124, f"{tool} {' '.join(args)} timed out"
    text = (done.stderr or done.stdout).strip()
    return done.returncode, text.splitlines()[0] if text else ""


def systemd_user_running():
    code, text = run(SYSTEMCTL, "--user", "show-environment")
    return code == 0, text or f"{SYSTEMCTL} --user show-environment exited {code}"


def install(launcher, flags):
    os_name = platform_name()
    if os_name == "linux":
        path = unit_path()
        ok, why = systemd_user_running()
        if not ok:  # checked first: a unit nothing will start is not written
            raise AutostartError(
                f"systemd's user instance is not running here ({why}): add \"{' '.join(command(launcher, flags))}\" "
                "to your desktop's startup applications instead")
        write_atomically(path, systemd_unit(launcher, flags))
        # restart, not start: an instance already running from an earlier install picks up the new flags.
        for args in (("daemon-reload",), ("enable", UNIT_NAME), ("restart", UNIT_NAME)):
            code, text = run(SYSTEMCTL, "--user", *args)
            if code:
                raise AutostartError(f"systemctl --user {' '.join(args)} failed: {text}")
        return (f"installed {path}: the pipeline starts with your session and now; logs: "
                f"journalctl --user -u {UNIT_NAME}; stop it with ./start_pipeline.sh uninstall")
    if os_name == "darwin":
        path = agent_path()
        write_atomically(path, launch_agent(launcher, flags))
        run(LAUNCHCTL, "unload", str(path))  # a loaded older copy would keep its old flags
        code, text = run(LAUNCHCTL, "load", "-w", str(path))
        if code:
            raise AutostartError(f"wrote {path} but launchctl load failed: {text}; it starts at your next login")
        return f"installed {path}: the pipeline starts at login and now; logs: ~/Library/Logs/denoiser.log"
    if os_name == "win32":
        path = startup_path()
        write_atomically(path, windows_startup(launcher, flags))
        return f"installed {path}: the pipeline starts, minimised, at your next login"
    raise AutostartError(f"autostart is for Linux, macOS and Windows, not {os_name}")


def uninstall():
    os_name = platform_name()
    path = {"linux": unit_path, "darwin": agent_path, "win32": startup_path}.get(os_name, lambda: None)()
    if path is None:
        raise AutostartError(f"autostart is for Linux, macOS and Windows, not {os_name}")
    if not path.exists():
        return f"not installed (no {path})"
    if os_name == "linux":
        run(SYSTEMCTL, "--user", "disable", "--now", UNIT_NAME)
    elif os_name == "darwin":
        run(LAUNCHCTL, "unload", "-w", str(path))
    path.unlink()
    if os_name == "linux":
        run(SYSTEMCTL, "--user", "daemon-reload")
    return f"uninstalled: removed {path}"


def status():
    os_name = platform_name()
    path = {"linux": unit_path, "darwin": agent_path, "win32": startup_path}.get(os_name, lambda: None)()
    if path is None or not path.exists():
        return "autostart: not installed"
    line = f"autostart: installed ({path})"
    if os_name == "linux":
        state = [run(SYSTEMCTL, "--user", verb, UNIT_NAME)[1] or "unknown" for verb in ("is-enabled", "is-active")]
        line += f", {state[0]}, {state[1]}"
    return line


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("install", "uninstall", "status") or (argv[0] == "install" and len(argv) < 2):
        print("usage: autostart.py install LAUNCHER [pipeline flags] | uninstall | status", file=sys.stderr)
        return 2
    try:
        if argv[0] == "install":
            print(install(argv[1], argv[2:]))
        else:
            print(uninstall() if argv[0] == "uninstall" else status())
    except (AutostartError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
