#!/usr/bin/env bash
# Installs, as root on Debian, what the live-audio tests need: a real sound server (PipeWire with its
# PulseAudio and ALSA faces, WirePlumber, a session bus), the pactl/paplay/parec clients and PortAudio.
# Idempotent: does nothing when everything is already there. tests/run_all.sh calls it before pytest.
#   usage: bash tests/install_sound_deps.sh
set -euo pipefail

PACKAGES="pipewire pipewire-pulse wireplumber pipewire-alsa pulseaudio-utils libportaudio2 dbus"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_sound_deps.sh: missing:$missing; run this as root" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install_sound_deps.sh: missing:$missing and no apt-get (not Debian?)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: recommends pull in desktop pieces (rtkit, libcamera) the tests do not need.
apt-get install -y -qq --no-install-recommends $missing >/dev/null
