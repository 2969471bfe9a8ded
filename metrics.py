"""The scores: SI-SNR, alignment by cross-correlation, PESQ wide-band, STOI, DNSMOS P.835 and a mean with its
interval. Used by evaluate.py for the published tables and by train.py for validation, so both measure alike."""
import math
import warnings

import numpy as np

from dsp import SAMPLE_RATE  # every metric runs at the pipelines' rate
MAX_LAG_MS = 100.0  # [1, 5000] ms, alignment search range either side; raise only for methods with more delay
DNSMOS_WINDOW_S = 9.01  # s; the DNSMOS P.835 model's fixed input; do not change
DNSMOS_HOP_S = 1.0  # s; hop between DNSMOS windows (published scheme); lower = slower, no gain
DNSMOS_LEVEL_DBFS = None  # score DNSMOS at this RMS level for every method (e.g. -26), as a listening test
                          # plays files at one level; None = as produced (the reference scheme), level-sensitive
CONFIDENCE = 0.95  # two-sided t-interval level of mean_ci


def si_snr(est, ref):
    est = np.asarray(est, np.float64) - np.mean(est)
    ref = np.asarray(ref, np.float64) - np.mean(ref)
    target = np.dot(est, ref) / (np.dot(ref, ref) + 1e-12) * ref
    noise = est - target
    return float(10 * np.log10((np.dot(target, target) + 1e-12) / (np.dot(noise, noise) + 1e-12)))


def align(y, ref, max_lag_ms=MAX_LAG_MS):
    """Shift y so it lines up with ref (best cross-correlation within +-max_lag_ms); returns
    (aligned copy of ref's length, lag in samples; positive = y was late)."""
    from scipy.fft import irfft, next_fast_len, rfft

    n = len(ref)
    y = np.asarray(y, np.float32)
    max_lag = int(SAMPLE_RATE * max_lag_ms / 1000)
    size = next_fast_len(len(y) + n)
    corr = irfft(rfft(y, size) * np.conj(rfft(ref, size)), size)
    lags = np.arange(-min(max_lag, n - 1), min(max_lag, len(y) - 1) + 1)
    values = corr[lags % size]
    lag = int(lags[np.argmax(values)]) if values.max() > 0 else 0
    out = np.zeros(n, np.float32)
    if lag >= 0:
        seg = y[lag:lag + n]
        out[:len(seg)] = seg
    else:
        seg = y[:n + lag]
        out[-lag:-lag + len(seg)] = seg
    return out, lag


def pesq_wb(ref, deg):
    """PESQ wide-band, or (nan, reason) when the clip cannot be scored."""
    from pesq import pesq

    try:
        return float(pesq(SAMPLE_RATE, ref, deg, "wb")), None
    except Exception as exc:  # BufferTooShortError, NoUtterancesError, ...
        msg = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return float("nan"), f"PESQ not scored ({msg.strip() or type(exc).__name__})"


def stoi_score(ref, deg):
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, deg, SAMPLE_RATE, extended=False))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        return float("nan"), "STOI not scored (too few speech frames; clip too short)"
    return value, None


class Dnsmos:
    """DNSMOS P.835 from the ONNX model that the speechmos package ships (run here directly:
    speechmos imports librosa and requests without declaring them)."""

    # Published mapping from raw model output to MOS (non-personalised P.835 model).
    POLY_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
    POLY_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
    POLY_OVRL = np.poly1d([-0.06766283, 1.11546468, 0.04602535])

    def __init__(self, level_dbfs=DNSMOS_LEVEL_DBFS):
        self.level_dbfs = level_dbfs
        from peers import onnx_session, package_file
        self.session = onnx_session(package_file("speechmos", "dnsmos_models/sig_bak_ovr.onnx",
                                                 "speechmos (DNSMOS models)"))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, audio):
        """Returns (SIG, BAK, OVRL) averaged over 9.01 s windows hopped by 1 s; shorter clips
        are tiled by repetition, as the reference implementation does."""
        win = int(DNSMOS_WINDOW_S * SAMPLE_RATE)
        hop = int(DNSMOS_HOP_S * SAMPLE_RATE)
        x = np.asarray(audio, np.float32)
        if len(x) == 0:
            return (float("nan"),) * 3
        if self.level_dbfs is not None:
            # DNSMOS hears level: the same output played 5 dB quieter reads as less residual noise (README).
            x = x * (10 ** (self.level_dbfs / 20) / (np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9))
            x = x.astype(np.float32)
        while len(x) < win:
            x = np.concatenate([x, x])
        n_win = int(np.floor(len(x) / SAMPLE_RATE) - DNSMOS_WINDOW_S) + 1
        segs = [x[i * hop:i * hop + win] for i in range(max(n_win, 1))]
        segs = np.stack([s for s in segs if len(s) == win])
        raw = self.session.run(None, {self.input_name: segs})[0]
        sig = self.POLY_SIG(raw[:, 0]).mean()
        bak = self.POLY_BAK(raw[:, 1]).mean()
        ovrl = self.POLY_OVRL(raw[:, 2]).mean()
        return float(sig), float(bak), float(ovrl)



def mean_ci(values):
    """(mean, half-width of the CONFIDENCE t-interval); nan where undefined."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


