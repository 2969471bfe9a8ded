"""dataset.py: corpus loading in any format, dynamic mixing at the requested SNR, the paired dev reader."""
import numpy as np
import pytest

import dataset


def test_load_corpus_any_format_rate_and_cache(tiny_corpus, tmp_path):
    clips = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    assert len(clips) == 8 and all(c.dtype == np.float32 for c in clips)
    lengths = sorted(len(c) for c in clips)
    assert 24000 in lengths  # 1.5 s of 48 kHz stereo became 1.5 s of 16 kHz mono
    assert all(abs(float(c.mean())) < 1e-3 for c in clips)  # DC removed
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(clips, again))


def test_silent_noise_is_skipped(tiny_corpus, tmp_path):
    noise = dataset.load_corpus(tiny_corpus / "noise", cache_dir=tmp_path, min_rms=dataset.SILENT_FILE_RMS)
    assert len(noise) == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        dataset.load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no audio files"):
        dataset.load_corpus(tmp_path / "empty")


def test_mixer_hits_requested_snr(tiny_corpus, tmp_path):
    speech = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    noise = dataset.load_corpus(tiny_corpus / "noise", cache_dir=tmp_path, min_rms=dataset.SILENT_FILE_RMS)
    rng = np.random.default_rng(0)
    for snr in (-5.0, 0.0, 7.5, 20.0):
        mixer = dataset.Mixer(speech, noise, 3200, snr_range_db=(snr, snr), two_noise_prob=0.5)
        for _ in range(20):
            noisy, clean = mixer.sample(rng)
            measured = 20 * np.log10(dataset.rms(clean) / dataset.rms(noisy - clean))
            assert abs(measured - snr) < 0.1
            assert np.abs(noisy).max() <= 0.99 + 1e-6
            assert dataset.rms(clean) > 0  # near-silent windows are re-drawn


def test_mixer_is_seeded_and_varied(tiny_corpus, tmp_path):
    speech = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    noise = dataset.load_corpus(tiny_corpus / "noise", cache_dir=tmp_path, min_rms=dataset.SILENT_FILE_RMS)
    mixer = dataset.Mixer(speech, noise, 3200)
    a = dataset.fixed_set(mixer, 8, seed=1)
    b = dataset.fixed_set(mixer, 8, seed=1)
    c = dataset.fixed_set(mixer, 8, seed=2)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    levels = [20 * np.log10(dataset.rms(x)) for x in a[0]]
    assert max(levels) - min(levels) > 3  # random overall level


def test_load_pairs(tiny_corpus, tmp_path):
    pairs = dataset.load_pairs(tiny_corpus / "dev")
    assert [p[0] for p in pairs] == ["d0.wav", "d1.wav"]
    assert all(len(n) == len(c) for _, n, c, _ in pairs)
    with pytest.raises(SystemExit, match="clean/ and noisy/"):
        dataset.load_pairs(tmp_path)


def test_real_dev_set_reads_snr_from_manifest(dev_dir):
    pairs = dataset.load_pairs(dev_dir)
    assert len(pairs) == 40
    assert sorted({p[3] for p in pairs}) == [-5, 0, 5, 10, 15, 20]


def test_mixer_scored_part_is_never_silent():
    """With context, a short word must land in the scored tail: SI-SNR on a silent tail is undefined."""
    rng = np.random.default_rng(0)
    word = rng.standard_normal(1000).astype(np.float32)
    noise = [rng.standard_normal(16000).astype(np.float32)]
    mixer = dataset.Mixer([word], noise, 6400, scored_samp=3200)
    for _ in range(40):
        _, clean = mixer.sample(rng)
        assert dataset.rms(clean[-3200:]) > 0.1 * dataset.rms(clean)


def test_utterance_snr_is_measured_over_the_whole_file():
    """--snr-span utterance: the SNR is the speech file's RMS against the noise's, as the dev set is mixed, so a
    window of the file's quiet half gets a lower local SNR than the requested one, and its loud half a higher."""
    rng = np.random.default_rng(0)
    loud = rng.standard_normal(3200).astype(np.float32)
    utterance = np.concatenate([loud, 0.1 * loud])  # file RMS is 3 dB below the loud half's
    noise = [rng.standard_normal(32000).astype(np.float32)]
    file_rms = dataset.rms(utterance)
    slices = np.lib.stride_tricks.sliding_window_view(utterance, 3200)
    local = []
    for span in ("window", "utterance"):
        mixer = dataset.Mixer([utterance], noise, 3200, snr_range_db=(5, 5), two_noise_prob=0.0, snr_span=span)
        for _ in range(20):
            noisy, clean = mixer.sample(rng)
            local_snr = 20 * np.log10(dataset.rms(clean) / dataset.rms(noisy - clean))
            if span == "window":
                assert abs(local_snr - 5) < 0.1
                continue
            # Which part of the file the window holds: the slice it is proportional to (Cauchy-Schwarz).
            start = np.argmax(np.abs(slices @ clean) / np.linalg.norm(slices, axis=1))
            assert abs(local_snr - (5 + 20 * np.log10(dataset.rms(slices[start]) / file_rms))) < 0.1
            local.append(local_snr)
    assert min(local) < 0 and max(local) > 7  # quiet windows sit well below 5 dB, loud ones above


def test_pause_windows_are_noise_at_its_mixed_level(tiny_corpus, tmp_path):
    speech = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    noise = dataset.load_corpus(tiny_corpus / "noise", cache_dir=tmp_path, min_rms=dataset.SILENT_FILE_RMS)
    mixer = dataset.Mixer(speech, noise, 3200, pause_prob=0.3)
    noisy, clean = dataset.fixed_set(mixer, 200, seed=3)
    pause = ~clean.any(axis=1)
    assert 35 < pause.sum() < 85  # about 30%
    assert all(dataset.rms(x) > 1e-4 for x in noisy[pause])  # noise, not silence, comes in
    assert np.abs(noisy).max() <= 0.99 + 1e-6
    # The spec's stream is untouched: without pauses the same seed gives the same examples as before.
    a = dataset.fixed_set(dataset.Mixer(speech, noise, 3200), 8, seed=3)
    b = dataset.fixed_set(dataset.Mixer(speech, noise, 3200, pause_prob=0.0), 8, seed=3)
    assert np.array_equal(a[0], b[0])
    with pytest.raises(SystemExit, match="pause share"):
        dataset.Mixer(speech, noise, 3200, pause_prob=1.0)
    with pytest.raises(SystemExit, match="SNR span"):
        dataset.Mixer(speech, noise, 3200, snr_span="file")


def dominant_hz(x, rate=16000):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


def test_speed_augmentation_scales_pitch_within_its_range():
    """SPEED_AUG plays the speech faster or slower: a 1 kHz tone comes out between 900 and 1100 Hz at +-10%,
    spread over that range, the window keeps its length and the SNR still holds."""
    rng = np.random.default_rng(0)
    tone = np.sin(2 * np.pi * 1000 * np.arange(64000) / 16000).astype(np.float32)
    noise = [0.1 * rng.standard_normal(32000).astype(np.float32)]
    plain = dataset.Mixer([tone], noise, 6400, snr_range_db=(10, 10), two_noise_prob=0.0)
    fast = dataset.Mixer([tone], noise, 6400, snr_range_db=(10, 10), two_noise_prob=0.0, speed_aug=0.1)
    assert {round(dominant_hz(plain.sample(rng)[1])) for _ in range(5)} == {1000}
    pitches = []
    for _ in range(40):
        noisy, clean = fast.sample(rng)
        assert len(clean) == len(noisy) == 6400
        assert abs(20 * np.log10(dataset.rms(clean) / dataset.rms(noisy - clean)) - 10) < 0.1
        pitches.append(dominant_hz(clean))
    assert 895 <= min(pitches) < 960 and 1040 < max(pitches) <= 1105


def test_filter_augmentation_reshapes_speech_and_noise_at_the_same_snr(tiny_corpus, tmp_path):
    """FILTER_AUG_PROB: white noise comes out tilted (low band against high band varies by several dB from
    example to example) where without it it stays flat; the requested SNR holds; off, the stream is the spec's."""
    speech = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    white = [np.random.default_rng(1).standard_normal(64000).astype(np.float32)]

    def tilts(mixer):
        rng, out = np.random.default_rng(2), []
        for _ in range(30):
            noisy, clean = mixer.sample(rng)
            assert abs(20 * np.log10(dataset.rms(clean) / dataset.rms(noisy - clean)) - 5) < 0.1
            power = np.abs(np.fft.rfft(noisy - clean)) ** 2
            out.append(10 * np.log10(power[:len(power) // 4].sum() / power[-len(power) // 4:].sum()))
        return np.array(out)

    kw = dict(snr_range_db=(5, 5), two_noise_prob=0.0)
    flat, shaped = tilts(dataset.Mixer(speech, white, 3200, **kw)), tilts(
        dataset.Mixer(speech, white, 3200, filter_aug_prob=1.0, **kw))
    assert np.abs(flat).max() < 1.0
    assert shaped.std() > 3.0 and np.abs(shaped).max() > 6.0
    a = dataset.fixed_set(dataset.Mixer(speech, white, 3200), 8, seed=4)
    b = dataset.fixed_set(dataset.Mixer(speech, white, 3200, filter_aug_prob=0.0, speed_aug=0.0), 8, seed=4)
    assert np.array_equal(a[0], b[0])
    with pytest.raises(SystemExit, match="filter augmentation share"):
        dataset.Mixer(speech, white, 3200, filter_aug_prob=1.5)
    with pytest.raises(SystemExit, match="speed range"):
        dataset.Mixer(speech, white, 3200, speed_aug=0.5)
