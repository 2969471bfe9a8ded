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
        # Every call-like option that keeps the SNR meaningful is on (clipping would change it).
        mixer = dataset.Mixer(speech, noise, 3200, snr_range_db=(snr, snr), two_noise_prob=0.5, babble_prob=0.3,
                              level_swing_prob=0.5, mic_colour_prob=0.5, clip_prob=0.0)
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
    """With the floor's past in front, a short word must land in the scored tail: SI-SNR on a silent tail is
    undefined."""
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
        mixer = dataset.Mixer([utterance], noise, 3200, **dict(dataset.PLAIN, snr_range_db=(5, 5), snr_span=span))
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


def dominant_hz(x, rate=16000):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


def band_db(x, low_hz, high_hz, rate=16000):
    power = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return 10 * np.log10(power[(f >= low_hz) & (f < high_hz)].sum() + 1e-20)


def plain(**changes):
    return dict(dataset.PLAIN, **changes)


def tones_by_source(n_per=3, seconds=1.0):
    """Speech stand-ins whose source shows in their pitch: source a is 500 Hz, b 1500 Hz, c 2500 Hz, d 3500 Hz."""
    t = np.arange(int(seconds * 16000)) / 16000
    speech, groups = [], []
    for g, hz in zip("abcd", (500, 1500, 2500, 3500)):
        for i in range(n_per):
            speech.append((0.1 * np.sin(2 * np.pi * hz * t + i)).astype(np.float32))
            groups.append(g)
    return speech, groups


def test_babble_is_other_talkers_never_the_targets_source():
    """BABBLE_PROB: the noise is 3-8 talkers drawn from other sources than the target's (its speaker
    cannot be among them), each at about one level."""
    speech, groups = tones_by_source()
    noise = [np.zeros(16000, np.float32) + 1e-3]
    mixer = dataset.Mixer(speech, noise, 8000, speech_groups=groups, **plain(babble_prob=1.0, snr_range_db=(0, 0)))
    rng = np.random.default_rng(0)
    talkers = set()
    for _ in range(40):
        noisy, clean = mixer.sample(rng)
        babble, target = noisy - clean, dominant_hz(clean)
        assert abs(20 * np.log10(dataset.rms(clean) / dataset.rms(babble))) < 0.1
        assert band_db(babble, target - 100, target + 100) < band_db(babble, 0, 8000) - 30  # not the target's
        present = [hz for hz in (500, 1500, 2500, 3500) if band_db(babble, hz - 100, hz + 100) >
                   band_db(babble, 0, 8000) - 20]
        assert present and target not in present
        talkers.add(len(present))
    assert talkers == {1, 2, 3}  # three other sources to draw 3-8 talkers from, in every combination
    # With a single source (the download_dataset.py layout), babble is drawn from other files of it.
    one = dataset.Mixer(speech[:3], noise, 8000, **plain(babble_prob=1.0))
    noisy, clean = one.sample(rng)
    assert dataset.rms(noisy - clean) > 0


def key_events():
    """Two synthetic keys: a 20 ms click on press, a quieter 10 ms one on release."""
    rng = np.random.default_rng(5)
    click = lambda ms, amp: (amp * rng.standard_normal(ms * 16) * np.exp(-np.arange(ms * 16) / 60)).astype(np.float32)
    return [(click(20, 0.5), click(10, 0.2)), (click(20, 0.4), click(10, 0.15))]


def test_typing_comes_in_bursts_at_human_rates(tmp_path):
    """TYPING_PROB: key presses (each followed by its release) 80-350 ms apart in bursts with pauses between;
    load_key_events pairs bucklespring's <key>-1 / <key>-0 files."""
    import soundfile as sf
    for k, (press, release) in enumerate(key_events()):
        sf.write(tmp_path / f"{k:02x}-1.flac", press, 16000)
        sf.write(tmp_path / f"{k:02x}-0.flac", release, 16000)
    keys = dataset.load_key_events(tmp_path)
    assert len(keys) == 2 and all(len(p) == 320 and len(r) == 160 for p, r in keys)
    speech = [0.05 * np.random.default_rng(0).standard_normal(160000).astype(np.float32)]
    mixer = dataset.Mixer(speech, [np.ones(100, np.float32)], 64000, key_events=keys, **plain(typing_prob=1.0))
    rng = np.random.default_rng(1)
    rates, longest_gaps = [], []
    for _ in range(20):
        noisy, clean = mixer.sample(rng)
        frames = (noisy - clean)[:64000].reshape(-1, 80)  # 5 ms frames
        loud = np.sqrt((frames ** 2).mean(1)) > 0.05 * np.sqrt((frames ** 2).mean(1)).max()
        onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
        rates.append(len(onsets) / 2 / 4.0)  # a press and a release per key, over 4 s
        longest_gaps.append(np.diff(onsets).max() * 0.005 if len(onsets) > 1 else 4.0)
    assert 1.0 < np.mean(rates) < 10.0  # 1-10 keys a second: people type 3-7
    assert np.mean(np.array(longest_gaps) >= 0.3) > 0.7  # pauses between bursts
    no_keys = dataset.Mixer(speech, [np.ones(100, np.float32)], 64000, **plain(typing_prob=1.0))
    assert no_keys.typing_prob == 0.0


def test_clipping_and_speech_level():
    """CLIP_PROB drives the input past full scale and clips it (the target keeps its shape); otherwise the
    peak stays under full scale; SPEECH_LEVEL_DBFS spreads the speech over its range."""
    rng = np.random.default_rng(0)
    speech = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    noise = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    clipping = dataset.Mixer(speech, noise, 3200, **plain(clip_prob=1.0))
    for _ in range(10):
        noisy, clean = clipping.sample(rng)
        assert np.abs(noisy).max() == 1.0 and (np.abs(noisy) == 1.0).sum() > 3
        assert np.abs(clean).max() > 0  # the target is not clipped with it
    levels = []
    level = dataset.Mixer(speech, noise, 3200, **plain(snr_range_db=(20, 20)))
    for _ in range(200):
        noisy, clean = level.sample(rng)
        assert np.abs(noisy).max() <= 0.99 + 1e-6
        levels.append(20 * np.log10(dataset.rms(clean)))
    assert min(levels) < -42 and max(levels) > -16 and max(levels) < -10 + 0.01


def test_snr_draws_favour_the_focus_band():
    rng = np.random.default_rng(0)
    speech = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    noise = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    share = {}
    for focus in (0.0, 0.6, 1.0):
        mixer = dataset.Mixer(speech, noise, 3200, **plain(snr_focus_share=focus))
        snrs = np.array([mixer.draw_snr(rng) for _ in range(4000)])
        assert snrs.min() >= -5 and snrs.max() <= 20
        share[focus] = np.mean(snrs <= 10)
    assert abs(share[0.0] - 0.6) < 0.03 and abs(share[0.6] - 0.84) < 0.03 and share[1.0] == 1.0
    narrow = dataset.Mixer(speech, noise, 3200, **plain(snr_range_db=(15, 15), snr_focus_share=1.0))
    assert narrow.draw_snr(rng) == 15  # a range outside the focus band is drawn as asked


def test_mic_colour_shapes_speech_and_noise_alike():
    """MIC_COLOUR_PROB: white speech and white noise come out tilted, the two alike (one microphone hears both),
    some band-limited below 8 kHz, at the requested SNR; off, the noise stays flat."""
    rng = np.random.default_rng(0)
    speech = [rng.standard_normal(64000).astype(np.float32)]
    noise = [rng.standard_normal(64000).astype(np.float32)]
    tilts, limited = {0.0: [], 1.0: []}, 0
    for prob in (0.0, 1.0):
        mixer = dataset.Mixer(speech, noise, 16000, **plain(mic_colour_prob=prob, snr_range_db=(5, 5)))
        for _ in range(30):
            noisy, clean = mixer.sample(rng)
            n = noisy - clean
            assert abs(20 * np.log10(dataset.rms(clean) / dataset.rms(n)) - 5) < 0.1
            tilt = band_db(n, 300, 1500) - band_db(n, 2500, 3700)
            assert abs(tilt - (band_db(clean, 300, 1500) - band_db(clean, 2500, 3700))) < 1.5
            tilts[prob].append(tilt)
            limited += band_db(n, 7900, 8000) < band_db(n, 1000, 1100) - 20
    assert np.abs(tilts[0.0]).max() < 0.5 and np.std(tilts[1.0]) > 3 * np.std(tilts[0.0])
    assert np.ptp(tilts[1.0]) > 4.0 and 5 <= limited <= 25  # about half of them band-limited


def test_noise_level_swings():
    rng = np.random.default_rng(0)
    speech = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    noise = [0.1 * rng.standard_normal(64000).astype(np.float32)]
    spread = {}
    for prob in (0.0, 1.0):
        mixer = dataset.Mixer(speech, noise, 32000, **plain(level_swing_prob=prob))
        out = []
        for _ in range(10):
            noisy, clean = mixer.sample(rng)
            frames = 10 * np.log10(((noisy - clean).reshape(-1, 1600) ** 2).mean(1))
            out.append(frames.max() - frames.min())
        spread[prob] = np.mean(out)
    assert spread[0.0] < 1.5 and spread[1.0] > 5.0


def test_corpus_groups_and_bad_mixing(tiny_corpus, tmp_path):
    clips, groups = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path, groups=True)
    assert len(clips) == len(groups) == 8 and sorted(set(groups)) == ["", "a"] and groups.count("a") == 6
    for kw, message in ((dict(clip_prob=1.5), "clip prob must be in"), (dict(snr_span="file"), "SNR span"),
                        (dict(speech_level_dbfs=(-10, -40)), "speech level range LOW HIGH"),
                        (dict(level_swing_db=50.0), "level swing"), (dict(colour=1.0), "unknown mixing option")):
        with pytest.raises(SystemExit, match=message):
            dataset.check_mixing(**kw)


def test_subfolders_can_be_left_out(tiny_corpus, tmp_path):
    """exclude takes globs of first-level subfolders (train.py --noise-exclude 'music_*'); files directly in the
    folder always stay, and the cache tells the two corpora apart."""
    everything = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path)
    without_a = dataset.load_corpus(tiny_corpus / "speech", cache_dir=tmp_path, exclude=("a*",))
    assert len(everything) == 8 and len(without_a) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 2
