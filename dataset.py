"""Training data for the denoiser: clean speech and noise mixed afresh for every example (dynamic mixing).

Used by train.py; run it alone to check a corpus and hear what the model trains on:

    python dataset.py --speech ../shared/data/train/speech --noise ../shared/data/train/noise \
        --keys ../shared/data/train/noise_events/keyboard --write-examples out/

Two layouts are read, both as "a folder of audio files, searched recursively":
  ../shared/data/train/{speech,noise}      (16 kHz Ogg/Opus; noise_events/keyboard: FLAC key one-shots)
  <dest>/{clean,noise} from download_dataset.py  (DNS Challenge 48 kHz WAV)
Any format soundfile reads, any rate, any channel count: mixed to mono, resampled to 16 kHz with soxr, DC
removed, and cached once as float32 in CACHE_DIR (decoding Opus is ~6x slower than FLAC; the cache makes a
restart take seconds). Edit the constants below or pass the matching flags to train.py.
"""
import argparse
import csv
import fnmatch
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from scipy.signal import butter, sosfilt

from dsp import SAMPLE_RATE  # everything is converted to the pipelines' rate
# ---- mixing: each a flag of train.py of the same name; [low, high] is the range each may take ----------------
SNR_RANGE_DB = (-5.0, 20.0)  # [-30, 60] SNR of each mixture; widen the top end if clean input gets damaged
SNR_FOCUS_DB = (-5.0, 10.0)  # [-30, 60] the SNRs of real calls in noise; SNR_FOCUS_SHARE of mixtures are drawn here
SNR_FOCUS_SHARE = 0.6        # [0, 1] share drawn in SNR_FOCUS_DB, the rest over SNR_RANGE_DB; up = more low SNR
SNR_SPAN = "window"          # "window": SNR over the training window; "utterance": over the whole speech file,
                             # as the dev set and DNS mix, so quiet syllables get the low local SNR they get in a call
SPEECH_LEVEL_DBFS = (-45.0, -10.0)  # [-80, 0] RMS of the speech, so the model sees quiet and loud microphones
CLIP_PROB = 0.05             # [0, 1] share of mixtures driven past full scale and clipped, as a cheap mic does
TWO_NOISE_PROB = 0.3         # [0, 1] share of mixtures with two noises at once (a fan plus a voice, say)
BABBLE_PROB = 0.15           # [0, 1] share of noise sources that are babble: BABBLE_TALKERS other talkers summed
BABBLE_TALKERS = (3, 8)      # [1, 32] fewest and most talkers in a babble; fewer = more intelligible, harder to remove
TYPING_PROB = 0.1            # [0, 1] share of noise sources that are typing, assembled from the keyboard one-shots
LEVEL_SWING_PROB = 0.3       # [0, 1] share of noise sources whose level wanders over the example (a passing car)
LEVEL_SWING_DB = 12.0        # [0, 40] peak-to-peak size of that wander; larger = less stationary noise
MIC_COLOUR_PROB = 0.5        # [0, 1] share of mixtures (speech and noise alike) given a random microphone response:
                             # low/high shelves of +-SHELF_DB, a 50-300 Hz high-pass, half the time a 4-8 kHz low-pass
SHELF_DB = 6.0               # [0, 20] largest shelf boost or cut of that response
# ------------------------------------------------------------------------------------------------------------
SILENT_SEGMENT_DB = -25.0    # re-draw a speech segment this far below its file's level (SI-SNR is undefined on silence)
SILENT_FILE_RMS = 1e-5       # noise files quieter than this are skipped
CACHE_DIR = ".cache"         # decoded corpora live here as .npz; delete it after changing the audio folders
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf"}

# The mixing options Mixer takes, with their defaults; train.py turns each into a flag and records it.
MIXING = {"snr_range_db": SNR_RANGE_DB, "snr_focus_db": SNR_FOCUS_DB, "snr_focus_share": SNR_FOCUS_SHARE,
          "snr_span": SNR_SPAN, "speech_level_dbfs": SPEECH_LEVEL_DBFS,
          "clip_prob": CLIP_PROB, "two_noise_prob": TWO_NOISE_PROB, "babble_prob": BABBLE_PROB,
          "babble_talkers": BABBLE_TALKERS, "typing_prob": TYPING_PROB, "level_swing_prob": LEVEL_SWING_PROB,
          "level_swing_db": LEVEL_SWING_DB, "mic_colour_prob": MIC_COLOUR_PROB, "shelf_db": SHELF_DB}
# What a plain mixture is: every call-like option off (the fixed validation windows, comparisons, tests).
PLAIN = dict(MIXING, snr_focus_share=0.0, clip_prob=0.0, two_noise_prob=0.0, babble_prob=0.0,
             typing_prob=0.0, level_swing_prob=0.0, mic_colour_prob=0.0)


def list_audio(folder, exclude=()):
    """Audio files under folder, sorted; exclude: glob patterns of first-level subfolders to leave out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: audio folder not found: {folder}")
    left_out = lambda p: any(fnmatch.fnmatch(p.relative_to(folder).parts[0], g) for g in exclude)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file() and not left_out(p))
    if not files:
        raise SystemExit(f"error: no audio files ({', '.join(sorted(AUDIO_EXTS))}) under {folder}")
    return files


def load_mono_16k(path):
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio - audio.mean()


def load_corpus(folder, cache_dir=CACHE_DIR, min_rms=0.0, groups=False, exclude=()):
    """All audio under folder as a list of float32 arrays at 16 kHz. The cache key covers every file's
    path, size and mtime, so an edited folder is decoded again. groups=True also returns each clip's source:
    the first folder under `folder` it sits in ("" for files directly in it), which babble uses to keep the
    target's own corpus, and so its speaker, out of the talkers behind it."""
    files = list_audio(folder, exclude)
    key = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode())
    cache = Path(cache_dir) / f"{Path(folder).name}-{key.hexdigest()[:12]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            flat, bounds = z["audio"], z["bounds"]
            kept = z["kept"] if "kept" in z else np.arange(len(bounds) - 1)
    else:
        from tqdm import tqdm
        clips, kept = [], []
        for i, p in enumerate(tqdm(files, desc=f"decoding {folder}", unit="file", leave=False)):
            try:
                clips.append(load_mono_16k(p))
                kept.append(i)
            except (RuntimeError, sf.LibsndfileError, ValueError) as e:
                print(f"warning: skipping unreadable {p}: {e}", file=sys.stderr)
        bounds = np.cumsum([0] + [len(c) for c in clips])
        flat = np.concatenate(clips) if clips else np.zeros(0, np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A per-process temporary name: torchrun's ranks may decode the same corpus at once, and each
        # atomic rename then leaves one complete, identical cache.
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, audio=flat, bounds=bounds, kept=np.array(kept, np.int64))
        os.replace(tmp, cache)
    source = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else "" for p in files]
    pairs = [(flat[a:b], source[k]) for a, b, k in zip(bounds[:-1], bounds[1:], kept) if b > a]
    pairs = [(c, g) for c, g in pairs if np.sqrt(np.mean(c ** 2)) > min_rms]
    if not pairs:
        raise SystemExit(f"error: every file under {folder} is empty or silent")
    clips = [c for c, _ in pairs]
    return (clips, [g for _, g in pairs]) if groups else clips


def load_key_events(folder):
    """Keyboard one-shots named <key>-<1 press | 0 release>.<ext> (bucklespring's naming) as
    [(press, release)] per key; a key with only one of the two uses it for both."""
    by_key = {}
    for p in list_audio(folder):
        key, _, kind = p.stem.rpartition("-")
        by_key.setdefault(key or p.stem, {})[kind] = load_mono_16k(p)
    return [(k.get("1", k.get("0")), k.get("0", k.get("1"))) for k in by_key.values()]


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def check_mixing(**opts):
    """Refuse mixing options Mixer cannot honour, all in one line. Mixer checks its own; train.py calls this
    first as well, so a bad flag fails before minutes of corpus decoding."""
    o = dict(MIXING, **opts)
    problems = [f"unknown mixing option {k}" for k in opts if k not in MIXING]
    if o["snr_span"] not in ("window", "utterance"):
        problems.append(f"SNR span must be 'window' or 'utterance' (got {o['snr_span']!r})")
    for name, what in (("snr_range_db", "SNR range"), ("snr_focus_db", "SNR focus band"),
                       ("speech_level_dbfs", "speech level range")):
        low, high = o[name]
        if not low <= high:
            problems.append(f"the {what} LOW HIGH needs LOW <= HIGH (got {low:g} {high:g})")
    if not (-80.0 <= o["speech_level_dbfs"][0] and o["speech_level_dbfs"][1] <= 0.0):
        problems.append("the speech level range must lie in -80..0 dBFS")
    for name in ("snr_focus_share", "clip_prob", "two_noise_prob", "babble_prob", "typing_prob",
                 "level_swing_prob", "mic_colour_prob"):
        if not 0.0 <= o[name] <= 1.0:
            problems.append(f"{name.replace('_', ' ')} must be in [0, 1] (got {o[name]:g})")
    if o["babble_prob"] + o["typing_prob"] > 1.0:
        problems.append("babble prob + typing prob must be at most 1 (they share the noise draws)")
    if not 1 <= o["babble_talkers"][0] <= o["babble_talkers"][1]:
        problems.append(f"babble talkers MIN MAX needs 1 <= MIN <= MAX (got {o['babble_talkers']})")
    if not 0.0 <= o["level_swing_db"] <= 40.0 or not 0.0 <= o["shelf_db"] <= 20.0:
        problems.append("level swing must be in 0..40 dB and shelf in 0..20 dB")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def shelf_sos(rate, freq, gain_db, high):
    """One RBJ-cookbook shelving biquad (slope 1) as a second-order section."""
    a, w = 10 ** (gain_db / 40), 2 * np.pi * freq / rate
    alpha, cos = np.sin(w) / 2 * np.sqrt(2), np.cos(w)
    s = -1 if high else 1  # the high shelf is the low shelf with the cosine's sign turned round
    b = [a * ((a + 1) - s * (a - 1) * cos + 2 * np.sqrt(a) * alpha),
         s * 2 * a * ((a - 1) - s * (a + 1) * cos),
         a * ((a + 1) - s * (a - 1) * cos - 2 * np.sqrt(a) * alpha)]
    den = [(a + 1) + s * (a - 1) * cos + 2 * np.sqrt(a) * alpha,
           -s * 2 * ((a - 1) + s * (a + 1) * cos),
           (a + 1) + s * (a - 1) * cos - 2 * np.sqrt(a) * alpha]
    return np.array([*(np.array(b) / den[0]), 1.0, den[1] / den[0], den[2] / den[0]])


def mic_response(rng, shelf_db=SHELF_DB):
    """A random microphone as second-order sections: low and high shelves, a high-pass and, half the time, the
    band limit of a headset or a narrow codec (4-8 kHz)."""
    sos = [shelf_sos(SAMPLE_RATE, rng.uniform(100, 400), rng.uniform(-shelf_db, shelf_db), high=False),
           shelf_sos(SAMPLE_RATE, rng.uniform(2000, 5000), rng.uniform(-shelf_db, shelf_db), high=True),
           *butter(2, rng.uniform(50, 300), "highpass", fs=SAMPLE_RATE, output="sos")]
    if rng.random() < 0.5:
        sos.extend(butter(6, rng.uniform(4000, 7800), "lowpass", fs=SAMPLE_RATE, output="sos"))
    return np.array(sos)


class Mixer:
    """Draws (noisy, clean) pairs of `length` samples that sound like a call: one or two noise sources (recorded
    noise, babble of other talkers, typing), levels that wander, a random microphone and speech level, now and
    then a clipped input. Files are picked in proportion to their length so a source of many one-second wake
    words does not outweigh an hour of audiobooks by file count alone. speech_groups (load_corpus's groups)
    keep babble to other sources than the target's; key_events (load_key_events) make typing possible."""

    def __init__(self, speech, noise, length, scored_samp=None, speech_groups=None, key_events=None, **mixing):
        check_mixing(**mixing)
        for name, value in dict(MIXING, **mixing).items():
            setattr(self, name, value)
        self.speech, self.noise, self.length = speech, noise, length
        self.key_events = key_events or []
        if not self.key_events:
            self.typing_prob = 0.0
        # The loss sees only the last scored_samp samples (the rest is context), so that part must not be silent.
        self.scored_samp = min(scored_samp or length, length)
        sl = np.array([len(s) for s in speech], np.float64)
        nl = np.array([len(n) for n in noise], np.float64)
        self.speech_p, self.noise_p = sl / sl.sum(), nl / nl.sum()
        self.speech_rms = [rms(s) for s in speech]
        self.groups = np.array(speech_groups if speech_groups is not None else [""] * len(speech))
        # Draw probabilities with one source left out, for babble, computed once per source instead of per talker.
        self.speech_p_without = {}
        for g in set(self.groups.tolist()):
            if (self.groups != g).any():
                p = np.where(self.groups == g, 0.0, self.speech_p)
                self.speech_p_without[g] = p / p.sum()

    def speech_segment(self, rng, scored=None, exclude=None):
        """A stretch of one speech file and that file's RMS; `scored` samples at its end must not be silent.
        exclude: a source whose files are not drawn (babble's talkers are never the target's)."""
        scored = scored or self.scored_samp
        p = self.speech_p_without.get(exclude, self.speech_p)
        for _ in range(20):
            i = rng.choice(len(self.speech), p=p)
            clip = self.speech[i]
            if len(clip) >= self.length:
                start = rng.integers(0, len(clip) - self.length + 1)
                seg = clip[start:start + self.length].copy()
            else:  # a short word lands at a random place in silence, as it would in a call
                seg = np.zeros(self.length, np.float32)
                start = rng.integers(0, self.length - len(clip) + 1)
                seg[start:start + len(clip)] = clip
            if 20 * np.log10(rms(seg[-scored:]) / self.speech_rms[i]) > SILENT_SEGMENT_DB:
                break
        return seg, self.speech_rms[i], i

    def babble(self, rng, target):
        """Several other talkers at about one level each (+-3 dB), from other sources than the target's."""
        out = np.zeros(self.length, np.float32)
        for _ in range(rng.integers(self.babble_talkers[0], self.babble_talkers[1] + 1)):
            seg, file_rms, _ = self.speech_segment(rng, scored=self.length, exclude=self.groups[target])
            out += seg * np.float32(10 ** (rng.uniform(-3, 3) / 20) / file_rms)
        return out

    def typing(self, rng):
        """Typing at human rates: bursts of 2-12 keys 80-350 ms apart, each press followed 40-140 ms later by
        its release, bursts 0.3-2 s apart, every key at its own level (+-4 dB)."""
        out = np.zeros(self.length + SAMPLE_RATE, np.float32)  # a second of room for the last key's tail
        t = -rng.uniform(0, 1.0)
        while t < self.length / SAMPLE_RATE:
            for _ in range(rng.integers(2, 13)):
                press, release = self.key_events[rng.integers(len(self.key_events))]
                gain = np.float32(10 ** (rng.uniform(-4, 4) / 20))
                for sound, at in ((press, t), (release, t + rng.uniform(0.04, 0.14))):
                    a = int(at * SAMPLE_RATE)
                    if a + len(sound) > 0 and a < self.length:
                        s = sound[max(0, -a):]
                        out[max(a, 0):max(a, 0) + len(s)] += gain * s
                t += rng.uniform(0.08, 0.35)
            t += rng.uniform(0.3, 2.0)
        out = out[:self.length]
        if rms(out) < 1e-6:  # a pause the whole length: one key somewhere, so the source is not silent
            press = self.key_events[rng.integers(len(self.key_events))][0][:self.length]
            a = rng.integers(0, self.length - len(press) + 1)
            out[a:a + len(press)] += press
        return out

    def recorded_noise(self, rng):
        clip = self.noise[rng.choice(len(self.noise), p=self.noise_p)]
        start = rng.integers(0, len(clip))
        reps = int(np.ceil((start + self.length) / len(clip)))
        # Looping a short noise file keeps it stationary-looking rather than padding with silence.
        return np.tile(clip, reps)[start:start + self.length].astype(np.float32)

    def noise_source(self, rng, target):
        kind = rng.random()
        if kind < self.babble_prob:
            x = self.babble(rng, target)
        elif kind < self.babble_prob + self.typing_prob:
            x = self.typing(rng)
        else:
            x = self.recorded_noise(rng)
        if self.level_swing_prob and rng.random() < self.level_swing_prob:
            # A level in dB that moves linearly between random points every 0.25-1 s.
            step = int(rng.uniform(0.25, 1.0) * SAMPLE_RATE)
            points = rng.uniform(-self.level_swing_db / 2, self.level_swing_db / 2, self.length // step + 2)
            db = np.interp(np.arange(self.length), np.arange(len(points)) * step, points)
            x = x * (10 ** (db / 20)).astype(np.float32)
        return x

    def draw_snr(self, rng):
        low, high = max(self.snr_range_db[0], self.snr_focus_db[0]), min(self.snr_range_db[1], self.snr_focus_db[1])
        if low <= high and rng.random() < self.snr_focus_share:
            return rng.uniform(low, high)
        return rng.uniform(*self.snr_range_db)

    def sample(self, rng):
        """One (noisy, clean) pair. The microphone colours speech and noise alike, so the target is the speech
        as that microphone hears it (a denoiser does not undo the mic)."""
        clean, utterance_rms, target = self.speech_segment(rng)
        noise = self.noise_source(rng, target)
        if rng.random() < self.two_noise_prob:
            second = self.noise_source(rng, target)
            noise = noise + second * np.float32(rms(noise) / rms(second) * 10 ** (rng.uniform(-10, 0) / 20))
        level = utterance_rms / rms(clean)  # the file's RMS over the window's, for the utterance span
        if self.mic_colour_prob and rng.random() < self.mic_colour_prob:
            sos = mic_response(rng, self.shelf_db)
            clean, noise = (sosfilt(sos, x).astype(np.float32) for x in (clean, noise))
        speech_rms = rms(clean) * (level if self.snr_span == "utterance" else 1.0)
        noise = noise * np.float32(speech_rms / rms(noise) / 10 ** (self.draw_snr(rng) / 20))
        noisy = clean + noise
        gain = 10 ** (rng.uniform(*self.speech_level_dbfs) / 20) / speech_rms
        peak = np.max(np.abs(noisy)) * gain
        clipped = self.clip_prob and rng.random() < self.clip_prob
        if clipped:  # driven 1-8 dB past full scale, whatever the level drawn
            gain *= 10 ** (rng.uniform(1, 8) / 20) / peak
        elif peak > 0.99:
            gain *= 0.99 / peak
        noisy = (noisy * gain).astype(np.float32)
        if clipped:
            noisy = np.clip(noisy, -1.0, 1.0)
        return noisy, (clean * gain).astype(np.float32)

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
    ap.add_argument("--keys", default="", help="keyboard one-shots for typing noise (train/noise_events/keyboard)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each written example")
    ap.add_argument("--write-examples", metavar="DIR", help="write a few noisy/clean example pairs here")
    ap.add_argument("--count", type=int, default=5)
    args = ap.parse_args(argv)
    if not 0.1 <= args.seconds <= 60 or args.count < 1:
        raise SystemExit("error: --seconds must be in 0.1..60 and --count at least 1")
    speech, groups = load_corpus(args.speech, groups=True)
    noise = load_corpus(args.noise, min_rms=SILENT_FILE_RMS)
    keys = load_key_events(args.keys) if args.keys else []
    hours = lambda clips: sum(len(c) for c in clips) / SAMPLE_RATE / 3600
    print(f"speech: {len(speech)} files, {hours(speech):.2f} h in {len(set(groups))} sources; "
          f"noise: {len(noise)} files, {hours(noise):.2f} h; {len(keys)} keys")
    if args.write_examples:
        out = Path(args.write_examples)
        out.mkdir(parents=True, exist_ok=True)
        mixer = Mixer(speech, noise, int(args.seconds * SAMPLE_RATE), speech_groups=groups, key_events=keys)
        rng = np.random.default_rng(0)
        for i in range(args.count):
            noisy, clean = mixer.sample(rng)
            sf.write(out / f"example{i}_noisy.wav", noisy, SAMPLE_RATE)
            sf.write(out / f"example{i}_clean.wav", clean, SAMPLE_RATE)
        print(f"wrote {args.count} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
