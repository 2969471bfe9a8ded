"""DSP chain: high-pass, gate, 5 ms latency, streaming == one-shot, file mode, bad input, benchmark."""
import numpy as np
import pytest
import soundfile as sf

import dsp
import dsp_filter_pipeline as D
from conftest import run_script, speechlike, tone


def level_db(x):
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-20)


def test_latency_is_one_frame():
    chain = D.DSPChain(D.default_config(gate=False))
    assert chain.latency_samples == 80 and D.latency_ms() == 5.0
    x = speechlike(1.0, dbfs=-20)  # broadband, so the correlation peak is unambiguous
    y = chain.process(x)
    assert not y[:80].any()
    lag = np.argmax(np.correlate(y[:12000], x[:10000], "valid"))
    assert lag == 80


def test_highpass_removes_rumble_keeps_voice():
    cfg = D.default_config(gate=False)
    for freq, lo, hi in ((30, -100, -30), (1000, -0.2, 0.2)):
        x = tone(freq, 2.0, amp=0.1)
        y = dsp.process_offline(D.DSPChain(cfg), x)
        change = level_db(y[8000:]) - level_db(x[8000:])
        assert lo < change < hi, (freq, change)


@pytest.mark.parametrize("block", [1, 37, 160, 512, 1600, 4096])
def test_streaming_equals_one_shot(block):
    cfg = D.default_config()
    x = np.concatenate([speechlike(1.0), np.zeros(8000, np.float32), speechlike(0.5, seed=1)])
    one_shot = D.DSPChain(cfg).process(x)
    chain = D.DSPChain(cfg)
    streamed = np.concatenate([chain.process(x[i:i + block]) for i in range(0, len(x), block)])
    assert np.abs(streamed - one_shot).max() <= 1e-6


def test_gate_behaviour_in_the_chain():
    rng = np.random.default_rng(0)
    speech = speechlike(1.0, dbfs=-25)
    pause = np.zeros(int(0.8 * 16000), np.float32)
    silence = (rng.standard_normal(32000) * 10 ** (-80 / 20)).astype(np.float32)
    x = np.concatenate([speech, pause, speech, silence])
    y = dsp.process_offline(D.DSPChain(D.default_config()), x)
    a, b = len(speech), len(speech) + len(pause)
    second = y[b:b + len(speech)]
    assert abs(level_db(second) - level_db(speech)) < 1.0  # still open after the 800 ms pause
    tail = y[-16000:]  # the last second of the -80 dBFS silence, after hold and release
    assert level_db(silence[-16000:]) - level_db(tail) >= 30


def test_file_mode_44k_stereo(tmp_path):
    rate = 44100
    x = np.stack([speechlike(1.0, rate=rate), speechlike(1.0, rate=rate, seed=1)], axis=1)
    sf.write(tmp_path / "in.flac", x, rate)
    r = run_script("dsp_filter_pipeline.py", "--input", tmp_path / "in.flac", "--output", tmp_path / "out.flac")
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "out.flac")
    assert (info.samplerate, info.channels, info.frames) == (rate, 1, len(x))
    r = run_script("dsp_filter_pipeline.py", "--input", tmp_path / "in.flac", "--output", tmp_path / "o16.wav",
                   "--keep-16k")
    assert r.returncode == 0 and sf.info(tmp_path / "o16.wav").samplerate == 16000


def test_bad_input_is_one_line(tmp_path):
    r = run_script("dsp_filter_pipeline.py", "--input", tmp_path / "missing.wav", "--output", tmp_path / "o.wav")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: input not found")
    r = run_script("dsp_filter_pipeline.py", "--input", tmp_path / "missing.wav")
    assert r.returncode == 2 and "needs both --input and --output" in r.stderr


def test_bench_prints_figures():
    r = run_script("dsp_filter_pipeline.py", "--bench")
    assert r.returncode == 0, r.stderr
    assert "real-time factor" in r.stdout and "algorithmic latency: 5 ms" in r.stdout
