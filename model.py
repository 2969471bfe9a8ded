"""The denoiser's U-Net: noisy log-magnitude spectrogram in, soft spectral mask in [0, 1] out.

Shared by train.py (training), export_model.py (ONNX export) and the tests, the way nanoGPT's model.py is
shared by train.py and sample.py. The live pipeline never imports this file: it runs the exported ONNX model.

    input   [B, 1, F, T]  log(|STFT| + LOG_EPS) of the noisy signal (F = 257 for a 512-point FFT)
                          (in_ch=2, train.py --floor-hops: a second channel, the noise floor; see noise_floor)
    output  [B, 1, F, T]  mask; clean magnitude estimate = mask * |noisy STFT|

Encoder  e1 = Conv(in_ch->C), e2 = Conv(C->2C, /2), e3 = Conv(2C->4C, /2), e4 = Conv(4C->8C, /2)
Bottom   b  = Conv(8C->16C, /2)
Decoder  UpBlock(16C->8C) + e4, UpBlock(8C->4C) + e3, UpBlock(4C->2C) + e2, UpBlock(2C->C) + e1
Head     Conv(C->1) + Sigmoid
With C = BASE_CH = 32 that is about 3.9 M parameters. Strides halve both frequency and time; every UpBlock
crops its upsampled map to its skip's size, so any F and any T >= 1 work (the live pipeline's
26-frame window and 100-frame training segments run through the same weights).

The low-latency streaming model (StreamNet, train.py --arch stream, denoiser_lowlatency.onnx) is a different
net for a different budget: 32 ms of algorithmic latency and a fiftieth of a core. Why it looks as it does:
  - A 512-point sqrt-Hann STFT with a 256-sample hop (32 ms window, 16 ms hop), analysis and synthesis alike: the
    two windows multiply to a periodic Hann, whose 50 % overlap-add is exactly one, so an all-ones mask gives the
    input back. Latency is the window, 32 ms; 16 ms hops halve the frame rate (and the cost) of 8 ms ones.
  - Memory in recurrent state instead of a 200 ms window: two GRUs carry what came before (the room, the voice),
    as NSNet2, DTLN and GTCRN do; nothing after the current frame is ever read, so the model is causal.
  - Level-free input: per bin, log|X| minus its own running mean (a 1 s exponential average, DeepFilterNet's
    mean normalisation), next to log|X| itself. The difference says "louder than this room usually is", which is
    speech, whatever the microphone's gain; the running mean is the model's noise memory.
  - Bins below 2 kHz one by one, ERB bands above (GTCRN's split): the 65 bins up to 2 kHz, where the harmonics
    are dense, keep a gain each; the 192 above are pooled into 48 ERB bands in and spread back out inside the
    graph, where the ear resolves less. The weights this saves at the edges go into the GRUs (208 wide), which
    scored better on dev and dev_real than every bin in and out at the same 0.46-0.48 M (docs/EXPERIMENTS.md).
    The second GRU is grouped (two halves, GTCRN's and DeepFilterNet's trick) after a full first GRU that mixes
    the groups. STREAM_BANDS = 0 gives every bin in and out (the previous shipped model, GRUs of 192).
  - A real mask in [0, 1] on the noisy phase, as the U-Net: bounded, so it can only remove, never invent.
    STREAM_MASK = "complex" makes it a complex gain of length below 1 (GTCRN's and DCCRN's choice): still only
    removing, but able to turn the phase, which a real mask leaves noisy wherever noise dominates a bin.
  - Optionally (STREAM_HEAD > 0) a small convolution across the inputs after the GRUs, the same filter slid along
    the bands, refines each gain from its neighbours and its own input (GTCRN's and FastEnhancer's layers shared
    across frequency); it looks at one frame only, so it adds no state and no latency. Inside it (STREAM_BAND_GRU
    > 0) a tiny GRU runs over time in every band, one set of weights for all (GTCRN's inter-frame path): a memory
    per band, where the GRUs above keep one for the whole frame. GTCRN's other path, a GRU across the bands within
    a frame, doubled the training step on 2 cores; the full-frame GRUs before the head already see every band.
Whole-utterance (StreamNet.forward) and frame-by-frame (StreamNet.step, what the ONNX export runs with its state
as an explicit input and output) share every weight and every operation, so they agree to float rounding.
"""
import math

import torch
import torch.nn as nn

from dsp import SAMPLE_RATE  # noqa: F401 (M.SAMPLE_RATE for train.py and export_model.py): one rate everywhere

BASE_CH = 32      # channels of the first layer: 32 = the shipped model (3.9 M params); 16 = 1 M, faster, less clean
N_FFT = 512       # STFT size the model was built for: 257 frequency bins
STFT_HOP_SAMP = 128  # STFT hop in samples (8 ms at 16 kHz)
LOG_EPS = 1e-6    # added to the magnitude before log; keeps digital silence finite (about -120 dB)
SILENT_LOG = -12.0  # a hop whose mean log-magnitude is below this is digital silence (zeros read -13.8):
                    # the noise floor skips it, so start-up zeros and a muted mic do not pose as the floor


def conv_block(c_in, c_out, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1, inplace=True),
    )


def crop_to(x, ref):
    """Crop x's last two dims to ref's. A stride-2 conv rounds odd sizes up and the transposed conv
    doubles, so the upsampled map is never smaller than its skip; always slicing (no Python branch)
    keeps the ONNX graph valid for every T."""
    return x[..., : ref.shape[-2], : ref.shape[-1]]


class UpBlock(nn.Module):
    """Transposed conv doubles F and T, the skip is added (not concatenated: half the weights, same
    quality in our probes), then a 3x3 conv mixes the two."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.mix = conv_block(c_out, c_out)

    def forward(self, x, skip):
        return self.mix(crop_to(self.up(x), skip) + skip)


class UNet(nn.Module):
    def __init__(self, base_ch=BASE_CH, in_ch=1):
        super().__init__()
        c = base_ch
        self.base_ch, self.in_ch = base_ch, in_ch
        self.e1 = conv_block(in_ch, c)
        self.e2 = conv_block(c, 2 * c, stride=2)
        self.e3 = conv_block(2 * c, 4 * c, stride=2)
        self.e4 = conv_block(4 * c, 8 * c, stride=2)
        self.bottleneck = conv_block(8 * c, 16 * c, stride=2)
        self.u4 = UpBlock(16 * c, 8 * c)
        self.u3 = UpBlock(8 * c, 4 * c)
        self.u2 = UpBlock(4 * c, 2 * c)
        self.u1 = UpBlock(2 * c, c)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, logmag):
        e1 = self.e1(logmag)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        e4 = self.e4(e3)
        d = self.bottleneck(e4)
        d = self.u4(d, e4)
        d = self.u3(d, e3)
        d = self.u2(d, e2)
        d = self.u1(d, e1)
        return torch.sigmoid(self.head(d))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --- the STFT contract, shared by training and export so both see exactly what the pipeline feeds ---

def stft_window(device=None):
    # Periodic Hann: its 75%-overlap sum is constant, so torch.istft inverts exactly.
    return torch.hann_window(N_FFT, periodic=True, device=device)


def stft(wave):
    """[B, N] waveform -> complex [B, F, T]. center=True: torch.istft cannot invert a Hann STFT without it
    (the NOLA check fails at the edges), so a 3200-sample window gives 1 + 3200 / 128 = 26 frames."""
    return torch.stft(wave, N_FFT, STFT_HOP_SAMP, window=stft_window(wave.device), center=True,
                      return_complex=True)


def istft(spec, length):
    return torch.istft(spec, N_FFT, STFT_HOP_SAMP, window=stft_window(spec.device), center=True,
                       length=length)


def log_magnitude(spec):
    """Complex [B, F, T] -> model input [B, 1, F, T]."""
    return torch.log(spec.abs() + LOG_EPS).unsqueeze(1)


def noise_floor(logmag):
    """Per-bin noise floor from the windows of the last few hops: [B, K, F, T] log-magnitudes of K windows,
    oldest first, 50% overlapped -> [B, F]. Each hop is summarised by the mean over the frames of its window's
    newer half (the audio that hop brought), and the floor is the minimum of those over the K hops: speech
    comes and goes within 2 s, the noise under it stays, so the minimum tracks the noise (minimum
    statistics). Hops of digital silence are skipped; with nothing else the current hop stands in."""
    stats = logmag[..., logmag.shape[-1] // 2:].mean(-1)                        # [B, K, F]
    silent = stats.mean(-1) < SILENT_LOG                                         # [B, K]
    floor = stats.masked_fill(silent[..., None], float("inf")).amin(1)
    return torch.where(silent.all(1, keepdim=True), stats[:, -1], floor)


def floor_past(floor_hops, window):
    """Samples of past audio in front of the window that a floor of floor_hops hops reads: K windows 50%
    overlapped span (K - 1) half-windows more than one."""
    return (floor_hops - 1) * (window // 2) if floor_hops else 0


def features(noisy, floor_hops=0, window=None):
    """What the model sees, exactly as the pipeline builds it: (complex STFT of the part the mask applies to,
    model input). Without a floor that is the whole of `noisy` and its log-magnitude [B, 1, F, T]. With
    floor_hops = K, `noisy` is K 50%-overlapped windows ((K - 1) * window / 2 + window samples): the mask
    applies to the last window, and a second input channel holds the noise floor of all K, repeated over T."""
    if not floor_hops:
        spec = stft(noisy)
        return spec, log_magnitude(spec)
    wins = noisy.unfold(-1, window, window // 2)                                 # [B, K, window]
    if wins.shape[1] != floor_hops:
        raise ValueError(f"{noisy.shape[-1]} samples make {wins.shape[1]} windows, not floor_hops={floor_hops}")
    b, k = wins.shape[:2]
    specs = stft(wins.reshape(b * k, window))
    logmag = log_magnitude(specs).reshape(b, k, *specs.shape[1:])                # [B, K, F, T]
    spec, current = specs.reshape(b, k, *specs.shape[1:])[:, -1], logmag[:, -1:]
    return spec, torch.cat([current, noise_floor(logmag)[:, None, :, None].expand_as(current)], 1)


def enhance(model, noisy, floor_hops=0, window=None, channels_last=False):
    """Waveform in, waveform out: mask x noisy magnitude with the noisy phase (the model predicts no phase;
    at 8 ms hops the noisy phase is good enough for speech above 0 dB SNR and costs nothing). With a noise
    floor (see features) the output is the last window only. channels_last: the memory layout x86 CPUs
    convolve fastest (training's); the mask comes back in float32 even under bf16 autocast, so the iSTFT
    and the loss stay in full precision."""
    spec, feats = features(noisy, floor_hops, window)
    if channels_last:
        feats = feats.contiguous(memory_format=torch.channels_last)
    mask = model(feats).squeeze(1).float()
    return istft(spec * mask, window if floor_hops else noisy.shape[-1]), mask


def widen_input(state, in_ch):
    """A state dict for a 1-input-channel UNet made to take in_ch channels: the new channels' weights start
    at zero, so the widened model computes exactly what the original did until fine-tuning finds a use for them."""
    w = state["e1.0.weight"]
    if w.shape[1] < in_ch:
        state = dict(state)
        state["e1.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], in_ch - w.shape[1], *w.shape[2:])], 1)
    return state


def average_checkpoints(paths):
    """One checkpoint whose weights are the plain average of several (a "model soup", Wortsman et al. 2022).
    Fine-tunes that start from one checkpoint stay in one basin of the loss, so their average is a working
    model that is often better than each; runs started apart would average into noise. BatchNorm statistics
    are averaged too (a step counter is taken from the first). The config and epoch are the first one's; the
    metrics, which no single checkpoint's validation measured, are dropped. A recipe setting the checkpoints
    differ on (a loss weight, a seed) becomes the list of their values, so the export's metadata says so.
    A single path comes back as saved, so callers taking one checkpoint or several need no second branch."""
    cks = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    if len(cks) == 1:
        return cks[0]
    ref, cfg = cks[0]["model"], cks[0].get("config", {})
    for path, ck in zip(paths[1:], cks[1:]):
        other = ck.get("config", {})
        same = ck["model"].keys() == ref.keys() and all(ck["model"][k].shape == v.shape for k, v in ref.items())
        if not same or any(other.get(k) != cfg.get(k) for k in ("floor_hops", "window_samp", "context_samp")):
            raise ValueError(f"{path} is not the same model as {paths[0]} (base_ch, noise floor, window and "
                             "context must match); only fine-tunes of one model average into a model")
    configs = [ck.get("config", {}) for ck in cks]
    mixed = {k: v if all(c.get(k) == v for c in configs) else [c.get(k) for c in configs] for k, v in cfg.items()}
    out = dict(cks[0], config=mixed, metrics={}, averaged_from=[str(p) for p in paths])
    out["model"] = {k: sum(ck["model"][k] for ck in cks) / len(cks) if v.is_floating_point() else v
                    for k, v in ref.items()}
    return out


# --- the low-latency streaming model -------------------------------------------------------------------------

STREAM_N_FFT = 512          # STFT size: 32 ms window, 257 bins; the algorithmic latency of the streaming model
STREAM_HOP_SAMP = 256       # hop: 16 ms, half the window (the sqrt-Hann pair overlap-adds to one only at 50 %)
STREAM_HIDDEN = 208         # GRU width; with 48 bands 0.46 M parameters (192 without bands: 0.48 M; budget 0.5 M)
STREAM_GROUPS = 2           # the second GRU is split in this many independent groups (fewer weights, same width)
STREAM_MASK = "real"        # "real": a gain per bin on the noisy phase; "complex": a gain that also turns the phase
STREAM_BANDS = 48           # bins above STREAM_LINEAR_BINS pooled into this many ERB bands; 0: every bin in and out
STREAM_LINEAR_BINS = 65     # with bands, the bins kept one by one (65 = up to 2 kHz, where the harmonics are dense)
STREAM_PHASE = False        # also feed the noisy phase (cos, sin) of the STREAM_LINEAR_BINS lowest bins: for a complex
                            # mask, which has nothing to turn the phase by without it (training only, not exported yet)
STREAM_HEAD = 0             # channels of a convolution across bands refining each gain from its neighbours; 0 = none
STREAM_BAND_GRU = 0         # with a head, width of a GRU over time per band inside it: each band's own memory of how
                            # it sounds; 0 = none, 8 = +0.1 M multiply-adds a frame (more = more memory, more CPU)
HEAD_KERNEL = 5             # that convolution's width in bands (two layers, the second dilated: +-6 bands in all)
NORM_TAU_S = 1.0            # time constant of the running mean each bin is measured against; longer = steadier
NORM_INIT = -7.0            # running mean's start (log|X|, about a quiet room); the state holds the offset from it
FEAT_CENTRE, FEAT_SCALE = -6.0, 4.0  # log|X| is mapped to (log|X| - centre) / scale: roughly -2..2 for speech


def erb_bands(bins=STREAM_N_FFT // 2 + 1, bands=STREAM_BANDS, linear=STREAM_LINEAR_BINS):
    """[bins, linear + bands] weights: the first `linear` bins map to themselves, the rest to `bands` triangles
    spaced evenly on the ERB-rate scale (Glasberg and Moore), neighbours overlapping so every bin's weights sum
    to one. Pooling power through it gives the model's inputs; its transpose spreads band gains back over bins."""
    hz = torch.arange(bins, dtype=torch.float64) * SAMPLE_RATE / (2 * (bins - 1))
    erb = 21.4 * torch.log10(1 + 0.00437 * hz)
    centres = torch.linspace(float(erb[linear]), float(erb[-1]), bands, dtype=torch.float64)
    w = torch.zeros(bins, linear + bands, dtype=torch.float64)
    w[:linear, :linear] = torch.eye(linear, dtype=torch.float64)
    step = centres[1] - centres[0]
    tri = (1 - (erb[linear:, None] - centres[None, :]).abs() / step).clamp_min(0)  # [bins - linear, bands]
    w[linear:, linear:] = tri / tri.sum(1, keepdim=True)
    return w.float()


def stream_window(device=None):
    """sqrt of the periodic Hann: analysis and synthesis windows multiply to a Hann, whose 50 % overlap-add is 1."""
    return torch.hann_window(STREAM_N_FFT, periodic=True, device=device).sqrt()


class StreamNet(nn.Module):
    """log|X| per frame -> mask per bin, causal. forward() takes [B, T, F] (a whole utterance, from zero state);
    step() takes one frame [B, F] and the packed state [B, state_size] and returns (mask, new state).
    The mask is [.., F] in [0, 1] (mask="real"), or [.., 2, F] (mask="complex": real and imaginary parts of a
    complex gain whose length, tanh of the raw pair's, stays below 1; apply_mask multiplies it in). With phase=True
    the cos and sin of the noisy phase of the lowest STREAM_LINEAR_BINS bins (stream_phase) are inputs as well,
    passed as phase= to forward and step: what a complex mask needs to know which way to turn."""

    def __init__(self, hidden=STREAM_HIDDEN, groups=STREAM_GROUPS, bins=STREAM_N_FFT // 2 + 1, mask=STREAM_MASK,
                 bands=STREAM_BANDS, phase=STREAM_PHASE, head=STREAM_HEAD, band_gru=STREAM_BAND_GRU):
        super().__init__()
        if hidden % groups:
            raise ValueError(f"hidden {hidden} must split into {groups} equal groups")
        if mask not in ("real", "complex"):
            raise ValueError(f"mask is 'real' or 'complex', not {mask!r}")
        if bands and not 2 <= bands <= bins - STREAM_LINEAR_BINS:
            raise ValueError(f"bands is 0 (every bin) or 2..{bins - STREAM_LINEAR_BINS}, not {bands}")
        if head and mask != "real":
            raise ValueError("the convolution head refines a real mask; use head=0 with a complex one")
        if band_gru and not head:
            raise ValueError("the per-band GRU sits inside the convolution head; give head channels too")
        self.hidden, self.groups, self.bins, self.mask, self.bands, self.head = hidden, groups, bins, mask, bands, head
        self.band_gru = band_gru
        self.width = STREAM_LINEAR_BINS + bands if bands else bins  # what the model sees and gives per frame
        if bands:  # fixed, not learnt: out of the state dict, so checkpoints hold only weights
            w = erb_bands(bins, bands)
            self.register_buffer("pool", w / w.sum(0), persistent=False)  # [bins, width]: mean power per band
            self.register_buffer("spread", w.t().contiguous(), persistent=False)  # [width, bins]: rows sum to one
        self.alpha = math.exp(-STREAM_HOP_SAMP / (SAMPLE_RATE * NORM_TAU_S))
        self.phase_bins = min(STREAM_LINEAR_BINS, bins) if phase else 0  # cos and sin of each as extra inputs
        self.inp = nn.Linear(2 * self.width + 2 * self.phase_bins, hidden)
        self.gru1 = nn.GRU(hidden, hidden, batch_first=True)
        g = hidden // groups
        self.gru2 = nn.ModuleList(nn.GRU(g, g, batch_first=True) for _ in range(groups))
        self.out = nn.Linear(hidden, self.width * (2 if mask == "complex" else 1 + 2 * bool(head)))
        if head:  # in: the GRUs' gain and two more channels per input, and that input's own two features
            k = HEAD_KERNEL
            self.refine = nn.Sequential(nn.Conv1d(5, head, k, padding=k // 2), nn.ReLU(),
                                        nn.Conv1d(head, head, k, padding=k // 2 * 2, dilation=2), nn.ReLU(),
                                        nn.Conv1d(head, 1, 1))
            nn.init.zeros_(self.refine[-1].weight)  # starts as the plain model: the head adds nothing until it learns
            nn.init.zeros_(self.refine[-1].bias)
        if band_gru:  # one small GRU, its weights shared by every band, each band with its own state
            self.along = nn.GRU(head, band_gru, batch_first=True)
            self.along_out = nn.Linear(band_gru, head)
            nn.init.zeros_(self.along_out.weight)  # starts as the model without it
            nn.init.zeros_(self.along_out.bias)
        # running mean per input, gru1's hidden, gru2's groups' hiddens, and each band's GRU hidden
        self.state_size = self.width + 2 * hidden + self.width * band_gru

    def features(self, logmag):
        """log|X| per bin -> per model input: itself, or with bands the log of the mean power in each band."""
        if not self.bands:
            return logmag
        return 0.5 * torch.log(torch.exp(2 * logmag) @ self.pool + LOG_EPS * LOG_EPS)

    def running_mean(self, logmag, mu0):
        """mu_t = a mu_{t-1} + (1 - a) x_t over [B, T, F] from mu0 [B, F], as one matrix product per chunk of
        frames (a Python loop over T would dominate a training step); returns [B, T, F]."""
        a, out, chunk = self.alpha, [], 256
        for s in range(0, logmag.shape[1], chunk):
            x = logmag[:, s:s + chunk]
            n = x.shape[1]
            t = torch.arange(n, device=x.device, dtype=x.dtype)
            lag = t[:, None] - t[None, :]
            weights = torch.where(lag >= 0, (1 - a) * a ** lag.clamp_min(0), torch.zeros_like(lag))  # [T, T]
            mu = torch.einsum("ts,bsf->btf", weights, x) + (a ** (t + 1))[None, :, None] * mu0[:, None]
            out.append(mu)
            mu0 = mu[:, -1]
        return torch.cat(out, 1)

    def core(self, logmag, mu, h1, h2, h3=None, phase=None):
        """Shared by forward and step: [B, T, F] features and running means (and with phase_bins the phase
        features [B, T, 2 x phase_bins]) -> mask [B, T, F] and GRU states (h3: the per-band GRU's, [1, B x width,
        band_gru], or None without it)."""
        feats = [(logmag - FEAT_CENTRE) / FEAT_SCALE, (logmag - mu) / FEAT_SCALE]
        if self.phase_bins:
            if phase is None:
                raise ValueError("this model takes the noisy phase too (phase_bins > 0): pass phase")
            feats.append(phase)
        feats = torch.cat(feats, -1)
        x = torch.relu(self.inp(feats))
        y1, h1 = self.gru1(x, h1)
        parts, states = y1.chunk(self.groups, -1), h2.chunk(self.groups, -1)
        outs = [gru(p, s.contiguous()) for gru, p, s in zip(self.gru2, parts, states)]
        y2 = torch.cat([o[0] for o in outs], -1) + y1
        raw = self.out(y2)
        if self.head:
            raw, h3 = self.refined(raw, feats[..., :2 * self.width], h3)
        mask = self.to_mask(raw)
        if self.bands:  # each bin a convex mix of its bands' gains: still within [0, 1], or of length below 1
            mask = mask @ self.spread
        return mask, h1, torch.cat([o[1] for o in outs], -1), h3

    def refined(self, raw, local, h3=None):
        """[B, T, 3 x width] from the GRUs and [B, T, 2 x width] features -> [B, T, width] gain logits: the GRUs'
        logit plus what the convolution across neighbouring inputs adds. The dense layers see the whole frame but
        weigh each input apart; the same small filter slid along the bands learns what a harmonic or a band edge
        looks like once, for all of them (GTCRN's and FastEnhancer's shared-across-frequency layers). With band_gru,
        a GRU over time per band (state h3, GTCRN's inter-frame path) adds to the first layer's channels: each
        band keeps its own memory of how it has sounded, where the GRUs before share one memory for the whole
        frame. Returns the logits and the new h3."""
        w, (b, t) = self.width, raw.shape[:2]
        # Each frame an image one band high, channels last: twice as fast to train on this CPU as Conv1d's layout
        # (the same weights, the same numbers to rounding).
        x = torch.cat([raw, local], -1).reshape(-1, self.refine[0].in_channels, 1, w)
        x = torch.relu(_conv_across(self.refine[0], x.contiguous(memory_format=torch.channels_last)))
        if self.band_gru:  # [B x T, head, 1, width] -> a sequence over time per band, and back
            x = x.permute(0, 2, 3, 1).reshape(b, t, w, -1).transpose(1, 2).reshape(b * w, t, -1)
            y, h3 = self.along(x, h3)
            x = (x + self.along_out(y)).reshape(b, w, t, -1).permute(0, 2, 3, 1).reshape(b * t, -1, 1, w)
            x = x.contiguous(memory_format=torch.channels_last)
        x = _conv_across(self.refine[4], torch.relu(_conv_across(self.refine[2], x)))
        return raw[..., :w] + x.reshape(b, t, w), h3

    def to_mask(self, raw):
        if self.mask == "real":
            return torch.sigmoid(raw)
        # A complex gain bounded like the real one (DCCRN's "E" mask): its direction turns the noisy phase, its
        # length tanh(|raw|) < 1 scales the bin, so it can still only remove.
        re, im = raw[..., :self.width], raw[..., self.width:]
        length = torch.sqrt(re * re + im * im + 1e-12)
        gain = torch.tanh(length) / length
        return torch.stack([re * gain, im * gain], -2)

    def split_state(self, state):
        """[B, state_size] -> running mean [B, width], gru1's and gru2's hiddens [1, B, hidden] and the
        per-band GRU's [1, B x width, band_gru] (None without it)."""
        b, h, e = self.width, self.hidden, self.width + 2 * self.hidden
        h3 = state[:, e:].reshape(1, -1, self.band_gru).contiguous() if self.band_gru else None
        # Without a per-band GRU gru2's slice stays open-ended, so models without one export the same graph as before
        return (state[:, :b] + NORM_INIT, state[:, None, b:b + h].transpose(0, 1).contiguous(),
                state[:, None, b + h:e if h3 is not None else None].transpose(0, 1).contiguous(), h3)

    def forward(self, logmag, state=None, phase=None):
        if state is None:
            state = logmag.new_zeros(logmag.shape[0], self.state_size)
        mu0, h1, h2, h3 = self.split_state(state)
        feats = self.features(logmag)
        mu = self.running_mean(feats, mu0)
        return self.core(feats, mu, h1, h2, h3, phase)[0]

    def step(self, logmag, state, phase=None):
        """One frame [B, F] and the state [B, state_size] -> (mask [B, F], state): what the ONNX model runs."""
        mu0, h1, h2, h3 = self.split_state(state)
        feats = self.features(logmag)
        mu = self.alpha * mu0 + (1 - self.alpha) * feats
        mask, h1, h2, h3 = self.core(feats[:, None], mu[:, None], h1, h2, h3,
                                     None if phase is None else phase[:, None])
        parts = [mu - NORM_INIT, h1[0], h2[0]] + ([h3[0].reshape(mu.shape[0], -1)] if self.band_gru else [])
        new_state = torch.cat(parts, -1)
        return mask[:, 0], new_state


def _conv_across(conv, x):
    """A Conv1d's weights applied as a Conv2d to [N, C, 1, width]."""
    return nn.functional.conv2d(x, conv.weight[:, :, None], conv.bias, padding=(0, conv.padding[0]),
                                dilation=(1, conv.dilation[0]))


class StreamStep(nn.Module):
    """StreamNet.step as a module's forward, for the ONNX export (one frame in, one frame out, state explicit)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, logmag, state):
        return self.net.step(logmag, state)


def stream_frames(wave):
    """[B, N] -> complex [B, T, F], T = N // hop: frame t ends at sample (t + 1) * hop, so the first frame is one
    hop of zeros and one of audio, exactly what the streaming pipeline holds after its first hop."""
    h = STREAM_HOP_SAMP
    n = wave.shape[-1] // h * h
    padded = torch.nn.functional.pad(wave[..., :n], (STREAM_N_FFT - h, 0))
    frames = padded.unfold(-1, STREAM_N_FFT, h) * stream_window(wave.device)
    return torch.fft.rfft(frames)


def stream_overlap_add(spec):
    """Complex [B, T, F] -> [B, T * hop]: inverse FFT, synthesis window, 50 % overlap-add. Output hop t is the
    first half of frame t plus the second half of frame t - 1, as the pipeline emits it after frame t; it is the
    input one hop earlier (STREAM_N_FFT - hop samples of delay), and the last hop of input is never finished."""
    h = STREAM_HOP_SAMP
    y = torch.fft.irfft(spec, n=STREAM_N_FFT) * stream_window(spec.device)
    first, second = y[..., :h], y[..., h:]
    second = torch.nn.functional.pad(second, (0, 0, 1, 0))[:, :-1]  # frame t - 1's second half, at t
    return (first + second).reshape(spec.shape[0], -1)


def apply_mask(spec, mask):
    """Complex spectrum [.., F] times a StreamNet mask: real [.., F], or complex as [.., 2, F]."""
    if mask.dim() == spec.dim() + 1:
        return spec * torch.complex(mask[..., 0, :], mask[..., 1, :])
    return spec * mask


def stream_log_magnitude(spec):
    return torch.log(spec.abs() + LOG_EPS)


def stream_phase(spec, bins):
    """Complex [.., F] -> [.., 2 x bins]: cos and sin of the phase of the lowest `bins` bins (0 and 0 at a silent
    bin), the phase features of a StreamNet with phase_bins."""
    low = spec[..., :bins]
    unit = low / (low.abs() + LOG_EPS)
    return torch.cat([unit.real, unit.imag], -1)


def enhance_stream(net, noisy):
    """[B, N] -> (enhanced [B, N'], mask), aligned with the input: N' = N // hop * hop - hop samples (the hop the
    pipeline's delay holds back is dropped from the end). Exactly the streaming pipeline's model-only output,
    with the delay removed."""
    spec = stream_frames(noisy)
    bins = getattr(net, "module", net).phase_bins  # DistributedDataParallel wraps the StreamNet in .module
    phase = stream_phase(spec, bins) if bins else None
    mask = net(stream_log_magnitude(spec), phase=phase)
    out = stream_overlap_add(apply_mask(spec, mask))
    return out[:, STREAM_N_FFT - STREAM_HOP_SAMP:], mask
