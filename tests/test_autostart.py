"""autostart.py through start_pipeline.sh: the systemd user unit (content, ordering, systemd-analyze verify),
idempotent install and uninstall, the error without a systemd user instance, and the macOS LaunchAgent and the
Windows Startup file by content.

No systemd user instance runs in this container (no systemd as PID 1), so a stand-in systemctl records what it is
asked; the unit file itself is checked by the real systemd-analyze where it is installed."""
import os
import plistlib
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO

FAKE_CTL = """#!/bin/sh
echo "$@" >> "$CTL_LOG"
case "$*" in *is-enabled*) echo enabled ;; *is-active*) echo active ;; esac
exit 0
"""


@pytest.fixture
def home(tmp_path):
    """A launcher folder and a home of its own: XDG_CONFIG_HOME, HOME and APPDATA all under tmp_path."""
    app = tmp_path / "my app"  # a space in the path, as "C:\\Users\\Jane Doe" has
    app.mkdir()
    for name in ("start_pipeline.sh", "start_pipeline.bat", "autostart.py"):
        shutil.copy(REPO / name, app / name)
    (app / "start_pipeline.sh").chmod(0o755)
    ctl = tmp_path / "systemctl"
    ctl.write_text(FAKE_CTL)
    ctl.chmod(ctl.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, DENOISER_PYTHON=sys.executable, XDG_CONFIG_HOME=str(tmp_path / "config"),
               HOME=str(tmp_path / "home"), APPDATA=str(tmp_path / "appdata"), DENOISER_SYSTEMCTL=str(ctl),
               DENOISER_LAUNCHCTL=str(ctl), CTL_LOG=str(tmp_path / "ctl.log"))
    return app, env, tmp_path


def launch(app, env, *args):
    return subprocess.run(["bash", str(app / "start_pipeline.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def calls(tmp_path):
    log = tmp_path / "ctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_install_writes_a_unit_that_starts_after_the_sound_server(home):
    app, env, tmp = home
    done = launch(app, env, "install", "--mic", "USB Mic", "b")
    assert done.returncode == 0, done.stderr
    unit = tmp / "config" / "systemd" / "user" / "denoiser.service"
    text = unit.read_text()
    assert f'ExecStart="{app}/start_pipeline.sh" --mic "USB Mic" b --quiet' in text
    assert f'WorkingDirectory={app}\n' in text
    after = next(line for line in text.splitlines() if line.startswith("After="))
    assert "pipewire.service" in after and "pulseaudio.service" in after and "wireplumber.service" in after
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    assert calls(tmp) == ["--user show-environment", "--user daemon-reload", "--user enable denoiser.service",
                          "--user restart denoiser.service"]
    assert "journalctl --user -u denoiser.service" in done.stdout
    if shutil.which("systemd-analyze"):
        runtime = tmp / "runtime"
        runtime.mkdir(mode=0o700)
        check = subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True, text=True,
                               env=dict(env, XDG_RUNTIME_DIR=str(runtime)), timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_install_and_uninstall_are_idempotent(home):
    app, env, tmp = home
    unit = tmp / "config" / "systemd" / "user" / "denoiser.service"
    assert launch(app, env, "install", "--gate-floor", "0.001").returncode == 0
    first = unit.read_text()
    assert launch(app, env, "install", "--gate-floor", "0.001").returncode == 0
    assert unit.read_text() == first and len(list(unit.parent.iterdir())) == 1
    status = launch(app, env, "status")
    assert status.returncode == 0 and "installed" in status.stdout and "enabled, active" in status.stdout
    gone = launch(app, env, "uninstall")
    assert gone.returncode == 0 and "removed" in gone.stdout and not unit.exists()
    assert "--user disable --now denoiser.service" in calls(tmp)
    again = launch(app, env, "uninstall")
    assert again.returncode == 0 and "not installed" in again.stdout
    assert "autostart: not installed" in launch(app, env, "status").stdout


def test_without_a_systemd_user_instance_install_says_what_to_do(home):
    app, env, tmp = home
    for systemctl in ("false", str(tmp / "no-such-systemctl")):
        done = launch(app, dict(env, DENOISER_SYSTEMCTL=systemctl), "install")
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: systemd's user instance is not running")
        assert "startup applications" in lines[0] and str(app / "start_pipeline.sh") in lines[0]
        assert not (tmp / "config" / "systemd" / "user" / "denoiser.service").exists()


def test_macos_launch_agent_by_content(home):
    app, env, tmp = home
    done = launch(app, dict(env, DENOISER_PLATFORM="darwin"), "install", "--mic", "USB & Co")
    assert done.returncode == 0, done.stderr
    path = tmp / "home" / "Library" / "LaunchAgents" / "org.denoiser.pipeline.plist"
    agent = plistlib.loads(path.read_bytes())
    assert agent["ProgramArguments"] == [str(app / "start_pipeline.sh"), "--mic", "USB & Co", "--quiet"]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardErrorPath"].endswith("Library/Logs/denoiser.log")
    assert f"load -w {path}" in calls(tmp)
    assert launch(app, dict(env, DENOISER_PLATFORM="darwin"), "uninstall").returncode == 0 and not path.exists()


def test_windows_startup_file_by_content():
    """The .bat cannot run here: autostart.py writes what start_pipeline.bat install asks for."""
    import autostart
    text = autostart.windows_startup(r"C:\Users\Jane Doe\denoiser\start_pipeline.bat", ["b", "--mic", "USB"])
    lines = text.split("\r\n")
    assert lines[0] == "@echo off" and text.endswith("\r\n")
    assert r'cd /d "C:\Users\Jane Doe\denoiser"' in lines
    start = next(line for line in lines if line.startswith("start "))
    assert start.endswith(r'/min cmd /c "C:\Users\Jane Doe\denoiser\start_pipeline.bat" b --mic USB --quiet')
    bat = (REPO / "start_pipeline.bat").read_text()
    assert 'autostart.py install "%~f0" %ARGS%' in bat and "autostart.py %VERB%" in bat


def test_windows_install_writes_into_the_startup_folder(home, monkeypatch):
    app, env, tmp = home
    import autostart
    monkeypatch.setenv("DENOISER_PLATFORM", "win32")
    monkeypatch.setenv("APPDATA", str(tmp / "appdata"))
    message = autostart.install(str(app / "start_pipeline.bat"), [])
    path = tmp / "appdata" / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup" / "Denoiser.cmd"
    assert str(path) in message and "--quiet" in path.read_text()
    assert autostart.uninstall().startswith("uninstalled") and not path.exists()
    assert autostart.uninstall().startswith("not installed")
