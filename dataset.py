"""Training data for the denoiser: clean speech and noise mixed afresh for every example (dynamic mixing).

Used by train.py; run it alone to check a corpus and hear what the model trains on:

    python dataset.py --speech ../shared/data/train/speech --noise ../shared/data/train/noise --write-examples out/

Two layouts are read, both as "a folder of audio files, searched recursively":
  ../shared/data/train/{speech,noise}      (16 kHz FLAC speech, Ogg/Opus noise)
  <dest>/{clean,noise} from download_dataset.py  (DNS Challenge 48 kHz WAV)
Any format soundfile reads, any rate, any channel count: mixed to mono, resampled to 16 kHz with soxr, DC
removed, and cached once as float32 in CACHE_DIR (decoding Opus is ~6x slower than FLAC; the cache makes a
restart take seconds). Edit the constants below or pass the matching flags to train.py.
"""
import argparse
import csv
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from scipy.signal import lfilter

SAMPLE_RATE = 16000          # Hz; everything is converted to this
SNR_RANGE_DB = (-5.0, 20.0)  # uniform SNR of each mixture; widen the top end if clean input gets damaged
SNR_SPAN = "window"          # "window": SNR over the training window (spec); "utterance": over the whole speech file,
                             # as the dev set and DNS mix, so quiet syllables get the low local SNR they get in a call
PAUSE_PROB = 0.0             # share of noise-only windows (a pause in speech); raise it if noise leaks through pauses
LEVEL_RANGE_DBFS = (-45.0, -15.0)  # RMS level of the mixture, so the model sees quiet and loud microphones
TWO_NOISE_PROB = 0.2         # share of mixtures with two noises at once (a fan plus a voice, say)
FILTER_AUG_PROB = 0.0        # share of speech and of noise segments given a random 2nd-order EQ (0 = spec); raise it
                             # when the training set is small: it stands in for other microphones and rooms
SPEED_AUG = 0.0              # speech speed (tempo and pitch) drawn in 1 +- this (0 = spec, 0.1 = +-10%): more voices
SILENT_SEGMENT_DB = -25.0    # re-draw a speech segment quieter than this relative to its file (SI-SNR is undefined on silence)
SILENT_FILE_RMS = 1e-5       # noise files quieter than this are skipped
CACHE_DIR = ".cache"         # decoded corpora live here as .npy; delete it after changing the audio folders
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf"}


def list_audio(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: audio folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())
    if not files:
        raise SystemExit(f"error: no audio files ({', '.join(sorted(AUDIO_EXTS))}) under {folder}")
    return files


def load_mono_16k(path):
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio - audio.mean()


def load_corpus(folder, cache_dir=CACHE_DIR, min_rms=0.0):
    """All audio under folder as a list of float32 arrays at 16 kHz. The cache key covers every file's
    path, size and mtime, so an edited folder is decoded again."""
    files = list_audio(folder)
    key = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
    cache = Path(cache_dir) / f"{Path(folder).name}-{key.hexdigest()[:12]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            flat, bounds = z["audio"], z["bounds"]
    else:
        from tqdm import tqdm
        clips = []
        for p in tqdm(files, desc=f"decoding {folder}", unit="file", leave=False):
            try:
                clips.append(load_mono_16k(p))
            except (RuntimeError, sf.LibsndfileError, ValueError) as e:
                print(f"warning: skipping unreadable {p}: {e}", file=sys.stderr)
        bounds = np.cumsum([0] + [len(c) for c in clips])
        flat = np.concatenate(clips) if clips else np.zeros(0, np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name: torchrun's ranks may decode the same corpus at once, and each
        # atomic rename then leaves one complete, identical cache.
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, audio=flat, bounds=bounds)
        os.replace(tmp, cache)
    clips = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    clips = [c for c in clips if np.sqrt(np.mean(c ** 2)) > min_rms]
    if not clips:
        raise SystemExit(f"error: every file under {folder} is empty or silent")
    return clips


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def check_mixing(snr_range_db=SNR_RANGE_DB, snr_span=SNR_SPAN, pause_prob=PAUSE_PROB,
                 filter_aug_prob=FILTER_AUG_PROB, speed_aug=SPEED_AUG):
    """Refuse mixing options Mixer cannot honour. Mixer checks its own; train.py calls this first as well, so a
    bad flag fails before minutes of corpus decoding."""
    problems = []
    if snr_span not in ("window", "utterance"):
        problems.append(f"SNR span must be 'window' or 'utterance' (got {snr_span!r})")
    if not snr_range_db[0] <= snr_range_db[1]:
        problems.append(f"the SNR range LOW HIGH needs LOW <= HIGH (got {snr_range_db[0]:g} {snr_range_db[1]:g})")
    if not 0.0 <= pause_prob < 1.0:
        problems.append(f"the pause share must be in [0, 1) (got {pause_prob:g})")
    if not 0.0 <= filter_aug_prob <= 1.0:
        problems.append(f"the filter augmentation share must be in [0, 1] (got {filter_aug_prob:g})")
    if not 0.0 <= speed_aug < 0.5:
        problems.append(f"the speed range must be in [0, 0.5) (got {speed_aug:g})")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


class Mixer:
    """Draws (noisy, clean) pairs of `length` samples. Files are picked in proportion to their length so a
    source of many one-second wake words does not outweigh an hour of audiobooks by file count alone."""

    def __init__(self, speech, noise, length, snr_range_db=SNR_RANGE_DB, level_range_dbfs=LEVEL_RANGE_DBFS,
                 two_noise_prob=TWO_NOISE_PROB, scored_samp=None, snr_span=SNR_SPAN, pause_prob=PAUSE_PROB,
                 filter_aug_prob=FILTER_AUG_PROB, speed_aug=SPEED_AUG):
        check_mixing(snr_range_db, snr_span, pause_prob, filter_aug_prob, speed_aug)
        self.speech, self.noise, self.length = speech, noise, length
        self.snr_span, self.pause_prob = snr_span, pause_prob
        self.filter_aug_prob, self.speed_aug = filter_aug_prob, speed_aug
        # The loss sees only the last scored_samp samples (the rest is context), so that part must not be silent.
        self.scored_samp = min(scored_samp or length, length)
        self.snr_range_db, self.level_range_dbfs, self.two_noise_prob = snr_range_db, level_range_dbfs, two_noise_prob
        sl = np.array([len(s) for s in speech], np.float64)
        nl = np.array([len(n) for n in noise], np.float64)
        self.speech_p, self.noise_p = sl / sl.sum(), nl / nl.sum()
        self.speech_rms = [rms(s) for s in speech]

    def speech_segment(self, rng):
        # Played faster by `speed`, a longer stretch of the file fills the window: tempo and pitch both scale.
        speed = rng.uniform(1 - self.speed_aug, 1 + self.speed_aug) if self.speed_aug else 1.0
        need = int(np.ceil(self.length * speed))
        for _ in range(20):
            i = rng.choice(len(self.speech), p=self.speech_p)
            clip = self.speech[i]
            if len(clip) >= need:
                start = rng.integers(0, len(clip) - need + 1)
                seg = clip[start:start + need].copy()
            else:  # a short word lands at a random place in silence, as it would in a call
                seg = np.zeros(need, np.float32)
                start = rng.integers(0, need - len(clip) + 1)
                seg[start:start + len(clip)] = clip
            if self.speed_aug:
                seg = soxr.resample(seg, SAMPLE_RATE * speed, SAMPLE_RATE).astype(np.float32)
                seg = np.pad(seg, (0, max(0, self.length - len(seg))))[:self.length]
            if 20 * np.log10(rms(seg[-self.scored_samp:]) / self.speech_rms[i]) > SILENT_SEGMENT_DB:
                break
        return seg, self.speech_rms[i]

    def random_eq(self, x, rng):
        """RNNoise's augmentation: a random 2nd-order filter (both polynomials' coefficients uniform in
        +-3/8, so it stays stable and minimum-phase) imitates another microphone or room, at the same RMS."""
        if not self.filter_aug_prob or rng.random() >= self.filter_aug_prob:
            return x
        b, a = [1.0, *rng.uniform(-0.375, 0.375, 2)], [1.0, *rng.uniform(-0.375, 0.375, 2)]
        y = lfilter(b, a, x).astype(np.float32)
        return y * np.float32(rms(x) / rms(y))

    def noise_segment(self, rng):
        clip = self.noise[rng.choice(len(self.noise), p=self.noise_p)]
        start = rng.integers(0, len(clip))
        reps = int(np.ceil((start + self.length) / len(clip)))
        # Looping a short noise file keeps it stationary-looking rather than padding with silence.
        return np.tile(clip, reps)[start:start + self.length].astype(np.float32)

    def sample(self, rng):
        """One (noisy, clean) pair. A pause example (clean all zeros) is mixed as a speech one and then has its
        speech removed, so its noise sits at the level it would have under speech."""
        clean, utterance_rms = self.speech_segment(rng)
        clean = self.random_eq(clean, rng)
        noise = self.random_eq(self.noise_segment(rng), rng)
        if rng.random() < self.two_noise_prob:
            second = self.noise_segment(rng)
            noise = noise + second * (rms(noise) / rms(second)) * 10 ** (rng.uniform(-10, 0) / 20)
        snr = rng.uniform(*self.snr_range_db)
        speech_rms = rms(clean) if self.snr_span == "window" else utterance_rms
        noise = noise * (speech_rms / rms(noise) / 10 ** (snr / 20))
        noisy = clean + noise
        gain = 10 ** (rng.uniform(*self.level_range_dbfs) / 20) / rms(noisy)
        peak = np.max(np.abs(noisy)) * gain
        if peak > 0.99:
            gain *= 0.99 / peak
        if self.pause_prob and rng.random() < self.pause_prob:
            clean = np.zeros_like(clean)
            noisy = noise
        return (noisy * gain).astype(np.float32), (clean * gain).astype(np.float32)

    def batch(self, rng, n):
        pairs = [self.sample(rng) for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def fixed_set(mixer, n, seed):
    """A seeded set of examples that is identical on every run, for comparable validation losses."""
    return mixer.batch(np.random.default_rng(seed), n)


def load_pairs(dev_dir):
    """Paired dev set: dev_dir/clean/NAME and dev_dir/noisy/NAME with the same names (../shared/data/dev).
    Returns [(name, noisy, clean, snr_db or None)], the SNR taken from manifest.csv when it is there."""
    dev_dir = Path(dev_dir)
    clean_dir, noisy_dir = dev_dir / "clean", dev_dir / "noisy"
    if not clean_dir.is_dir() or not noisy_dir.is_dir():
        raise SystemExit(f"error: {dev_dir} needs clean/ and noisy/ folders with matching file names")
    names = sorted(p.name for p in clean_dir.iterdir() if p.suffix.lower() in AUDIO_EXTS)
    missing = [n for n in names if not (noisy_dir / n).exists()]
    if missing or not names:
        raise SystemExit(f"error: dev set {dev_dir}: {len(missing)} clean files have no noisy twin "
                         f"(first: {missing[:1]})" if missing else f"error: no audio in {clean_dir}")
    snr = {}
    if (dev_dir / "manifest.csv").exists():
        with open(dev_dir / "manifest.csv", newline="") as f:
            snr = {row["name"]: float(row["snr_db"]) for row in csv.DictReader(f) if row.get("snr_db")}
    return [(n, load_mono_16k(noisy_dir / n), load_mono_16k(clean_dir / n), snr.get(Path(n).stem))
            for n in names]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speech", required=True)
    ap.add_argument("--noise", required=True)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each written example")
    ap.add_argument("--write-examples", metavar="DIR", help="write a few noisy/clean example pairs here")
    ap.add_argument("--count", type=int, default=5)
    args = ap.parse_args(argv)
    speech = load_corpus(args.speech)
    noise = load_corpus(args.noise, min_rms=SILENT_FILE_RMS)
    hours = lambda clips: sum(len(c) for c in clips) / SAMPLE_RATE / 3600
    print(f"speech: {len(speech)} files, {hours(speech):.2f} h; noise: {len(noise)} files, {hours(noise):.2f} h")
    if args.write_examples:
        out = Path(args.write_examples)
        out.mkdir(parents=True, exist_ok=True)
        mixer = Mixer(speech, noise, int(args.seconds * SAMPLE_RATE))
        rng = np.random.default_rng(0)
        for i in range(args.count):
            noisy, clean = mixer.sample(rng)
            sf.write(out / f"example{i}_noisy.wav", noisy, SAMPLE_RATE)
            sf.write(out / f"example{i}_clean.wav", clean, SAMPLE_RATE)
        print(f"wrote {args.count} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
