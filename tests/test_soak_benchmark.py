"""soak_benchmark.py: the delay measurement, its input checks, and a short live run through the private server."""
import numpy as np
import pytest

import soak_benchmark as S
from conftest import run_script
from sound_server import ensure_packages


def test_delay_is_measured_to_a_fraction_of_a_sample():
    x = S.speechlike(6.0)
    for lag in (0, 1000, 3217):
        y = np.concatenate([np.zeros(lag, np.float32), x])[:len(x)]
        assert S.delay_ms(x, 0.5 * y) == pytest.approx(1000 * lag / S.GRAPH_RATE_HZ, abs=0.01)
    # Between samples: the mean of the signal 1000 and 1001 samples late is 1000.5 samples late.
    late = lambda n: np.concatenate([np.zeros(n, np.float32), x])[:len(x)]
    assert S.delay_ms(x, 0.5 * (late(1000) + late(1001))) == pytest.approx(1000 * 1000.5 / S.GRAPH_RATE_HZ, abs=0.01)


def test_bad_settings_are_one_line_errors():
    for args, message in ((["--minutes", "0.1"], "must be in 0.5..600"),
                          (["--minutes", "0.5", "--warmup-s", "40"], "shorter than the warm-up"),
                          (["--pipeline", "gpu"], "invalid choice")):
        r = run_script("soak_benchmark.py", *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_short_soak_of_the_dsp_pipeline_prints_its_figures(sound_server):
    """Half a minute live (the sound_server fixture only makes sure the packages are there: the benchmark starts
    a server of its own). Figures are printed, not judged: this is a benchmark."""
    assert ensure_packages() is None
    r = run_script("soak_benchmark.py", "--pipeline", "dsp", "--minutes", "0.5", "--warmup-s", "5", "--window-s",
                   "5", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("soak: dsp pipeline", "after warm-up: underruns=", "delay at start:", "drift:", "memory (RSS):"):
        assert needle in out, out
    start = float(out.split("delay at start: ")[1].split(" ms")[0])
    assert 5 < start < 500  # the cable really carries the microphone, some tens of ms later
