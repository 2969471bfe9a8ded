#!/usr/bin/env bash
# Starts the live noise suppressor on Linux and macOS: microphone -> pipeline -> virtual cable.
#
#   ./start_pipeline.sh                  # the ML pipeline (ml_denoiser_pipeline.py)
#   ./start_pipeline.sh fast             # the ML pipeline with the 32 ms low-latency model (--low-latency)
#   ./start_pipeline.sh b                # the lightweight DSP pipeline (dsp_filter_pipeline.py)
#   ./start_pipeline.sh list             # list the sound devices (list_devices.py)
#   ./start_pipeline.sh b --mic USB      # any other flag goes to the pipeline (see its --help)
#   ./start_pipeline.sh --keep-devices   # Linux: leave the virtual microphone in place after stopping
#   ./start_pipeline.sh install [flags]  # start with the desktop session (systemd user unit / LaunchAgent)
#   ./start_pipeline.sh uninstall        # stop starting with the session; `status` says whether it does
#   ./start_pipeline.sh ab               # toggle bypass (raw microphone, same delay) in the running instance
#
# First run: creates the virtual environment .venv and installs requirements.txt into it (needs internet once;
# no torch). Starting again stops the instance already running, through the PID file it wrote (never by
# killing other Python processes). Ctrl+C stops cleanly.
# Linux: creates the virtual microphone the way NoiseTorch does, with pactl, so it works on PipeWire and on
# PulseAudio: a null sink "denoiser_cable" that the pipeline writes into, and a source "denoised_mic" shown as
# "Denoised microphone" that remaps the sink's monitor. Pick "Denoised microphone" in Zoom/Teams. Creating it
# twice is harmless; it is removed when the pipeline stops unless --keep-devices.
# macOS: install BlackHole 2ch first (brew install blackhole-2ch) and pick "BlackHole 2ch" in the call app.
# Edit the settings below, or the constants at the top of the pipeline scripts.
# DENOISER_PYTHON=/path/to/python uses that interpreter instead of .venv (no set-up).

VENV_DIR=".venv"                          # virtual environment, relative to this folder
PID_FILE=".cache/pipeline.pid"            # "launcher-PID pipeline-PID" of the running instance
STOP_TIMEOUT_S=10                         # how long a previous instance gets to stop before it is killed
CABLE_SINK="denoiser_cable"               # Linux: null sink the pipeline writes into (live_audio's default)
CABLE_SINK_DESCRIPTION="Denoiser cable"   # its name in sound settings
MIC_SOURCE="denoised_mic"                 # Linux: the virtual microphone apps record from
MIC_SOURCE_DESCRIPTION="Denoised microphone"  # the name apps show
FIRST_RUN_FILE=".cache/first_run_shown"   # once this exists, the "pick it in your call app" advice is not repeated

set -u
cd "$(dirname "$0")" || exit 1

die() {
    echo "error: $*" >&2
    exit 1
}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

# ---- which script -----------------------------------------------------------------------------------------------
SCRIPT="ml_denoiser_pipeline.py"
VERB=""
case "${1:-}" in
    b) SCRIPT="dsp_filter_pipeline.py"; shift ;;
    fast) shift; set -- --low-latency "$@" ;;
    list) SCRIPT="list_devices.py"; shift ;;
    install|uninstall|status|ab) VERB="$1"; shift ;;
    -h|--help|help) usage; exit 0 ;;
    ""|-*) ;;
    *) die "unknown verb '$1': use nothing (ML pipeline), 'fast' (low latency), 'b' (DSP pipeline), 'list', 'install', 'uninstall', 'status' or 'ab'" ;;
esac
KEEP_DEVICES=0
ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--keep-devices" ]; then KEEP_DEVICES=1; else ARGS+=("$arg"); fi
done

# ---- Python and first-run set-up --------------------------------------------------------------------------------
setup_venv() {
    if [ -x "$VENV_DIR/bin/python" ] && cmp -s requirements.txt "$VENV_DIR/requirements.installed"; then
        return 0
    fi
    local base
    base="$(command -v python3 || command -v python)" || die "Python 3 not found: install Python 3.10 or newer"
    echo "first run: creating $VENV_DIR and installing requirements.txt (once; needs internet)"
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        "$base" -m venv "$VENV_DIR" || {
            rm -rf "$VENV_DIR"
            die "could not create $VENV_DIR (on Debian/Ubuntu: sudo apt install python3-venv)"
        }
    fi
    "$VENV_DIR/bin/python" -m pip install -r requirements.txt ||
        die "installing requirements.txt failed (see above); fix it and run this again"
    cp requirements.txt "$VENV_DIR/requirements.installed"
}

if [ -n "${DENOISER_PYTHON:-}" ]; then
    PY="$DENOISER_PYTHON"
else
    setup_venv
    PY="$VENV_DIR/bin/python"
fi

if [ "$SCRIPT" = "list_devices.py" ]; then
    exec "$PY" "$SCRIPT" ${ARGS[@]+"${ARGS[@]}"}
fi
case "$VERB" in
    install) exec "$PY" autostart.py install "$PWD/start_pipeline.sh" ${ARGS[@]+"${ARGS[@]}"} ;;
    uninstall) exec "$PY" autostart.py uninstall ;;
    status)
        "$PY" autostart.py status
        if [ -f "$PID_FILE" ] && read -r launcher child < "$PID_FILE" && kill -0 "$launcher" 2>/dev/null; then
            echo "running: PID $launcher (pipeline $child)"
        else
            echo "not running"
        fi
        exit 0 ;;
esac

# ---- one instance at a time -------------------------------------------------------------------------------------
cmdline_of() {
    if [ -r "/proc/$1/cmdline" ]; then
        tr '\0' ' ' < "/proc/$1/cmdline"
    else
        ps -p "$1" -o command= 2>/dev/null
    fi
}

# True when PID $1 is alive and its command line contains $2 (a PID reused by another program is left alone).
pid_runs() {
    [ -n "$1" ] && [ "$1" -gt 0 ] 2>/dev/null && kill -0 "$1" 2>/dev/null || return 1
    case "$(cmdline_of "$1")" in *"$2"*) return 0 ;; esac
    return 1
}

stop_previous() {
    [ -f "$PID_FILE" ] || return 0
    local old_launcher="" old_child="" waited=0
    read -r old_launcher old_child < "$PID_FILE"
    if pid_runs "$old_launcher" "start_pipeline.sh"; then
        echo "stopping the previous instance (PID $old_launcher)"
        kill -TERM "$old_launcher" 2>/dev/null
        while pid_runs "$old_launcher" "start_pipeline.sh" && [ "$waited" -lt $((STOP_TIMEOUT_S * 10)) ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if pid_runs "$old_launcher" "start_pipeline.sh"; then
            kill -KILL "$old_launcher" 2>/dev/null
        fi
    fi
    if pid_runs "${old_child:-}" "_pipeline.py"; then
        kill -KILL "$old_child" 2>/dev/null
    fi
    rm -f "$PID_FILE"
}

if [ "$VERB" = "ab" ]; then  # SIGUSR1: the pipeline's A/B switch when no terminal is attached to it
    launcher="" child=""
    [ -f "$PID_FILE" ] && read -r launcher child < "$PID_FILE"
    pid_runs "${child:-}" "_pipeline.py" || die "no pipeline is running (start one with ./start_pipeline.sh)"
    kill -USR1 "$child" && echo "toggled bypass in the running pipeline (PID $child); its status line says which"
    exit 0
fi

# ---- Linux virtual microphone -----------------------------------------------------------------------------------
default_node() {  # default_node Sink|Source -> the server's current default
    LC_ALL=C pactl info 2>/dev/null | sed -n "s/^Default $1: //p"
}

has_node() {  # has_node sinks|sources NAME
    pactl list short "$1" 2>/dev/null | cut -f2 | grep -qx "$2"
}

create_devices() {
    [ "$(uname -s)" = "Linux" ] || return 0
    if ! command -v pactl >/dev/null; then
        echo "warning: pactl not found (sudo apt install pulseaudio-utils): cannot create the virtual microphone" >&2
        return 0
    fi
    if ! pactl info >/dev/null 2>&1; then
        echo "warning: no PipeWire/PulseAudio server answers: cannot create the virtual microphone" >&2
        return 0
    fi
    local old_sink old_source
    old_sink="$(default_node Sink)"
    old_source="$(default_node Source)"
    if ! has_node sinks "$CABLE_SINK"; then
        pactl load-module module-null-sink "sink_name=$CABLE_SINK" channels=1 \
            "sink_properties='device.description=\"$CABLE_SINK_DESCRIPTION\"'" >/dev/null ||
            die "could not create the null sink $CABLE_SINK"
    fi
    if ! has_node sources "$MIC_SOURCE"; then
        pactl load-module module-remap-source "source_name=$MIC_SOURCE" "master=$CABLE_SINK.monitor" channels=1 \
            "source_properties='device.description=\"$MIC_SOURCE_DESCRIPTION\"'" >/dev/null ||
            die "could not create the source $MIC_SOURCE"
    fi
    # A new device may become the system default (on a machine with no other devices, it does): give the
    # defaults back, or system sounds would go into the call and the pipeline would hear itself.
    if [ -n "$old_sink" ] && [ "$old_sink" != "$CABLE_SINK" ] && [ "$(default_node Sink)" != "$old_sink" ] &&
        has_node sinks "$old_sink"; then
        pactl set-default-sink "$old_sink"
    fi
    if [ -n "$old_source" ] && [ "$old_source" != "$MIC_SOURCE" ] && [ "$old_source" != "$CABLE_SINK.monitor" ] &&
        [ "$(default_node Source)" != "$old_source" ] && has_node sources "$old_source"; then
        pactl set-default-source "$old_source"
    fi
    if [ ! -f "$FIRST_RUN_FILE" ]; then
        echo "first run: the virtual microphone \"$MIC_SOURCE_DESCRIPTION\" is made. In Zoom, Teams, Meet or" \
            "Discord pick \"$MIC_SOURCE_DESCRIPTION\" as the microphone and turn the app's own noise" \
            "suppression off (two suppressors fight and speech comes out choppy)."
        touch "$FIRST_RUN_FILE"
    fi
}

remove_devices() {
    [ "$(uname -s)" = "Linux" ] && command -v pactl >/dev/null || return 0
    local id name args
    # Source first: it hangs off the sink's monitor.
    for wanted in "module-remap-source source_name=$MIC_SOURCE" "module-null-sink sink_name=$CABLE_SINK"; do
        pactl list short modules 2>/dev/null | while IFS=$'\t' read -r id name args; do
            case "$name $args" in
                "${wanted}"|"${wanted} "*) pactl unload-module "$id" 2>/dev/null ;;
            esac
        done
    done
}

# ---- run ----------------------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$PID_FILE")"
stop_previous
create_devices

CHILD=""
cleanup() {
    if [ "$KEEP_DEVICES" = 0 ]; then
        remove_devices
    fi
    if [ -f "$PID_FILE" ] && [ "$(cut -d' ' -f1 "$PID_FILE")" = "$$" ]; then
        rm -f "$PID_FILE"
    fi
}
forward_stop() {
    # The pipeline stops cleanly on SIGTERM (closes its streams, prints its summary).
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap forward_stop INT TERM HUP
trap cleanup EXIT

echo "$$" > "$PID_FILE"
"$PY" "$SCRIPT" ${ARGS[@]+"${ARGS[@]}"} &
CHILD=$!
echo "$$ $CHILD" > "$PID_FILE"
RC=0
while :; do
    wait "$CHILD"
    RC=$?
    kill -0 "$CHILD" 2>/dev/null || break
done
if [ "$RC" -gt 128 ]; then  # the wait was cut by a signal just as the pipeline ended: ask for its own status
    wait "$CHILD" 2>/dev/null
    STATUS=$?
    [ "$STATUS" = 127 ] || RC=$STATUS
fi
exit "$RC"
