"""The shared DSP module: STFT twin of torch, framing, EQ, gate, limiter, file I/O."""
import numpy as np
import pytest
import soundfile as sf

import dsp
from conftest import speechlike, tone

H = 1600  # the ML pipeline's hop


def db(x):
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-20)


def test_window_stft_matches_torch_and_inverts():
    torch = pytest.importorskip("torch")
    import model
    w = dsp.WindowSTFT(3200, 512, 128)
    x = np.random.default_rng(1).standard_normal(3200).astype(np.float32)
    spec = w.forward(x)
    ref = model.stft(torch.from_numpy(x)[None])[0].numpy()
    assert spec.shape == ref.shape == (257, 26)
    assert np.abs(spec - ref).max() < 1e-5 * np.abs(ref).max()
    mask = np.random.default_rng(2).random(spec.shape).astype(np.float32)
    ref_inv = model.istft(torch.from_numpy(ref * mask)[None], 3200)[0].numpy()
    assert np.abs(w.inverse(spec * mask) - ref_inv).max() < 1e-5
    assert np.abs(w.inverse(spec) - x).max() < 1e-5


@pytest.mark.parametrize("block", [1, 37, 160, 512, 1600, 4096])
def test_framer_any_block_size_same_output(block):
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    make = lambda: dsp.Framer(160, lambda f: f * 2.0)
    ref = make().process(x)
    out = np.concatenate([make_f.process(x[i:i + block]) for make_f in [make()] for i in range(0, len(x), block)])
    assert np.array_equal(out, ref)
    assert np.allclose(ref[160:], 2 * x[:-160]) and not ref[:160].any()


def test_eq_response():
    eq = dsp.BandBoost(5.0, 100.0, 1000.0)
    for freq, want in ((400, 5.0), (4000, 0.0)):
        x = tone(freq, 2.0)
        y = eq.process(x)
        assert abs(db(y[8000:]) - db(x[8000:]) - want) <= 0.5, freq


def test_eq_state_carries_across_blocks():
    x = speechlike(1.0)
    whole = dsp.BandBoost(5.0, 100.0, 1000.0).process(x)
    eq = dsp.BandBoost(5.0, 100.0, 1000.0)
    parts = np.concatenate([eq.process(x[i:i + 1600]) for i in range(0, len(x), 1600)])
    assert np.abs(parts - whole).max() < 1e-6


def ml_gate():
    return dsp.Gate(floor=0.0003, ceil=0.004, hold_frames=8, release_frames=3, depth_db=60, attack_samp=80, frame=H)


def run_gate(gate, x):
    return np.concatenate([gate.process(x[i:i + H]) for i in range(0, len(x), H)])


def test_gate_holds_through_800ms_pause():
    speech = speechlike(2.0, dbfs=-25)
    pause = np.zeros(int(0.8 * 16000), np.float32)
    x = np.concatenate([speech, pause, speech])
    gate = ml_gate()
    gains = []
    for i in range(0, len(x), H):
        gate.process(x[i:i + H])
        gains.append(gate.gain)
    pause_hops = range(len(speech) // H, (len(speech) + len(pause)) // H)
    assert min(gains[i] for i in pause_hops) > 0.99


def test_gate_attenuates_silence_by_30db():
    rng = np.random.default_rng(0)
    silence = (rng.standard_normal(32000) * 10 ** (-80 / 20)).astype(np.float32)  # 2 s at -80 dBFS
    out = run_gate(ml_gate(), silence)
    assert db(silence) - db(out) >= 30


def test_gate_passes_quiet_fricative_after_speech():
    rng = np.random.default_rng(0)
    speech = speechlike(1.0, dbfs=-25)
    gap = np.zeros(3200, np.float32)
    burst = rng.standard_normal(1280)  # 80 ms of hiss, like an "s"
    burst = (burst * 10 ** (-45 / 20) / np.sqrt(np.mean(burst ** 2))).astype(np.float32)
    x = np.concatenate([speech, gap, burst, np.zeros(H, np.float32)])
    out = run_gate(ml_gate(), x)
    start = len(speech) + len(gap)
    assert abs(db(out[start:start + 1280]) - db(burst)) < 1.0


def test_gate_opens_without_click():
    gate = ml_gate()
    x = np.concatenate([np.zeros(8 * H, np.float32), tone(300, 1.0, amp=0.3)])
    y = run_gate(gate, x)
    assert np.abs(np.diff(y)).max() < 0.1  # the 300 Hz tone's own max step is 0.035


def test_limiter_never_exceeds_full_scale():
    x = tone(440, 0.5, amp=10 ** (12 / 20))  # +12 dBFS
    y = dsp.soft_limit(x)
    assert np.abs(y).max() < 1.0
    quiet = tone(440, 0.1, amp=0.5)
    assert np.array_equal(dsp.soft_limit(quiet), quiet)


def test_sanitize_warns_once(capsys):
    state = {}
    x = np.array([0.1, np.nan, np.inf, -np.inf], np.float32)
    assert np.array_equal(dsp.sanitize(x, state), np.array([0.1, 0, 0, 0], np.float32))
    dsp.sanitize(x, state)
    assert capsys.readouterr().err.count("warning") == 1


def test_read_audio_errors(tmp_path):
    with pytest.raises(dsp.AudioError, match="not found"):
        dsp.read_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunkjunkjunk")
    with pytest.raises(dsp.AudioError, match="cannot read"):
        dsp.read_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(dsp.AudioError, match="empty"):
        dsp.read_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(dsp.AudioError, match="cannot read"):
        dsp.read_audio(tmp_path / "notes.txt")


def test_read_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([tone(1000, 1.0, rate=44100), tone(1000, 1.0, rate=44100)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 44100)
    mono, rate, channels, frames = dsp.read_audio(tmp_path / "s.wav")
    assert (rate, channels, frames) == (44100, 2, 44100)
    assert abs(len(mono) - 16000) <= 1 and abs(db(mono[1000:-1000]) - db(stereo[:, 0])) < 0.1


def test_write_is_atomic_and_checks_format(tmp_path):
    dsp.write_audio(tmp_path / "a.flac", tone(440, 0.1), 16000)
    assert sf.info(tmp_path / "a.flac").format == "FLAC"
    assert [p.name for p in tmp_path.iterdir()] == ["a.flac"]  # no temporary left behind
    with pytest.raises(dsp.AudioError, match="unknown output format"):
        dsp.write_audio(tmp_path / "a.xyz", tone(440, 0.1), 16000)
