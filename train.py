"""Train the denoiser's U-Net, or the low-latency streaming model (model.py), on clean speech + noise mixed on
the fly like a call (dataset.py).

    python train.py --out-dir checkpoints/mine          # from scratch on ../shared/data/train
    python train.py --resume --out-dir checkpoints/mine # carry on from last.pt, as it was started
    python train.py --init-from checkpoints/stoi6b/epoch4.pt --floor-hops 20 --snr-span utterance \
        --mag-weight 10 --stoi-weight 200 --lr 2e-4 --epochs 12 --out-dir checkpoints/callmix   # docs/TRAINING.md
    python train.py --arch stream --out-dir checkpoints/stream   # the 32 ms model (docs/TRAINING.md)
    python train.py --speech DNS/clean --noise DNS/noise   # the layout download_dataset.py writes
    torchrun --nproc_per_node=4 train.py                # several GPUs (DistributedDataParallel)

Then `python export_model.py --checkpoint OUT_DIR/best.pt --output my.onnx` turns a checkpoint into a model.

What the model learns on is exactly what the live pipeline feeds it: one 3200-sample (200 ms) window (with
FLOOR_HOPS, also the noise floor of the last 2 s as a second input channel), a 512-point Hann STFT with 128-sample
hops and center=True (26 frames), log-magnitude in, mask out. The loss is SI-SNR of the waveform rebuilt from
mask x noisy magnitude with the noisy phase, so the model is judged on the audio a listener hears, phase errors
included, plus MAG_WEIGHT x a compressed-magnitude term and STOI_WEIGHT x a STOI band-envelope term.
Validation each epoch: SI-SNR on a fixed synthetic set, and SI-SNR improvement, PESQ-WB and STOI on the paired
dev sets (DEV and the real recordings of DEV_REAL) run through the pipeline's 50%-overlap windowing;
best.pt keeps the epoch with the best mean over both sets (SELECT_SNR_WEIGHT), and each epoch is kept too.
The streaming model (--arch stream) learns on STREAM_SEGMENT_SAMP-long examples run frame by frame from zero
state, exactly as the pipeline runs it from start-up, and is scored on the whole example.
Runs on CUDA (bf16 autocast), Apple MPS or CPU, picked automatically. Every constant below and every mixing
constant of dataset.py is a flag of the same name (SPEECH -> --speech, SNR_RANGE_DB -> --snr-range-db).
"""
import argparse
import concurrent.futures
import copy
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dataset
import dsp
import ml_denoiser_pipeline as pipeline
import model as M

# ---- settings: edit here or pass --flag-name VALUE; [low, high] is the range each may take -------------------
SPEECH = "../shared/data/train/speech"       # clean speech, searched recursively
NOISE = "../shared/data/train/noise"         # noise recordings, searched recursively
NOISE_EXCLUDE = ""                           # comma-separated globs of NOISE's subfolders to leave out ("music_*")
KEYS = "../shared/data/train/noise_events/keyboard"  # key one-shots for typing noise ("" for none)
DEV = "../shared/data/dev"                   # paired clean/ and noisy/ for validation ("" to skip)
DEV_REAL = "../shared/data/dev_real"         # real recorded pairs, validated beside DEV ("" or absent: skip)
OUT_DIR = "checkpoints"                      # last.pt, best.pt, epochN.pt and train_log.csv go here
ARCH = "unet"              # "unet": the 200 ms U-Net (denoiser.onnx); "stream": the 32 ms model (denoiser_lowlatency)
STREAM_SEGMENT_SAMP = 32000  # [2048, 480000] --arch stream: samples per training example; longer = more memory learnt
STREAM_HIDDEN = M.STREAM_HIDDEN  # [16, 512] --arch stream: GRU width; see model.py
STREAM_MASK = M.STREAM_MASK  # --arch stream: "real" gain per bin, or "complex" (also turns the phase); model.py
STREAM_BANDS = M.STREAM_BANDS  # [0, 192] --arch stream: 0 = every bin in and out, N = ERB bands above 2 kHz; model.py
STREAM_PHASE = M.STREAM_PHASE  # --arch stream: also feed the low bins' noisy phase (--stream-phase); model.py
STREAM_HEAD = M.STREAM_HEAD  # [0, 64] --arch stream: channels of the convolution across bands after the GRUs; model.py
STREAM_BAND_GRU = M.STREAM_BAND_GRU  # [0, 64] --arch stream: a GRU per band inside that head, its width; model.py
SEGMENT_SAMP = 3200        # [256, 32000] training window; 3200 = the pipeline's window, which it must match
FLOOR_HOPS = 0             # [0, 100] noise floor over this many 100 ms hops as a second input (0 = none, 20 = 2 s)
FLOOR_START_PROB = 0.25    # [0, 1] with FLOOR_HOPS, share of examples whose past is cut short, as after start-up
BATCH_SIZE = 64            # [1, 4096] windows per step; 64 x 0.2 s = 12.8 s of audio
EPOCHS = 50                # [1, 10000] the cosine schedule spans all of them
STEPS_PER_EPOCH = 200      # [1, 100000] mixing is dynamic, so an "epoch" is a step count; 200 ~ 8 min on 2 cores
LR = 1e-3                  # [0, 1] Adam start; lower to 5e-4 if the loss jumps about, 1e-4..3e-4 to fine-tune
LR_MIN = 1e-5              # [0, 1] cosine annealing floor
MAG_WEIGHT = 0.0           # [0, 1000] weight of a compressed-magnitude term in the loss; up = cleaner quiet bins
MAG_POWER = 0.3            # [0.05, 2] that term compares |STFT|^MAG_POWER; lower weighs quiet bins more
STOI_WEIGHT = 0.0          # [0, 10000] weight of a STOI band-envelope term; up = more intelligibility, less SI-SNR
GRAD_CLIP = 5.0            # [0.01, 1000] max gradient norm; SI-SNR gradients spike on near-silent windows
VAL_EXAMPLES = 256         # [1, 100000] fixed synthetic validation windows
DEV_FILES = 40             # [0, 100000] pairs of each dev set scored each epoch (0 = none); ~0.3 s a pair
SELECT_SNR_WEIGHT = 0.1    # [0, 10] best.pt maximises the mean over the dev sets of PESQ-WB + this x SI-SNRi (dB):
                           # 0.1 values 1 dB of noise removed as much as 0.1 PESQ; raise it to favour removal
KEEP_EPOCHS = True         # also keep each epoch's weights as epochN.pt, to compare epochs with the full chain
SEED = 1234                # [0, 4294967295] data and init seed; each DDP rank offsets it
NUM_THREADS = 0            # [0, 256] CPU threads for torch; 0 = all cores
BASE_CH = M.BASE_CH        # [4, 128] U-Net width; see model.py
# ------------------------------------------------------------------------------------------------------------
MIXING_NAMES = [k.upper() for k in dataset.MIXING]  # dataset.py's mixing constants, flags here too


def si_snr(est, ref, eps=1e-8):
    """Scale-invariant SNR in dB per row of [B, N]. Zero-mean first: a DC offset is not speech."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps) * ref
    noise = est - proj
    return 10 * torch.log10(proj.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


def si_snr_loss(est, ref):
    return -si_snr(est, ref).mean()


def stream_stft(wave):
    """The streaming model's own STFT as [B, F, T], for the loss terms: a quarter of the U-Net STFT's frames."""
    return M.stream_frames(wave).transpose(-1, -2)


def compressed_mag_loss(est, ref, noisy, power=MAG_POWER, spec_fn=M.stft):
    """Mean squared error of |STFT|^power per row of [B, N] (Braun & Tashev 2021). SI-SNR is ruled by the loud
    vowels; the compression lifts quiet bins (consonants, the noise left in pauses) that decide intelligibility
    and how clean the background sounds. Both signals are divided by the input's RMS, so the term does not
    depend on the mixture's level, and it is defined on silent references too."""
    scale = noisy.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8
    # clamp: the gradient of x^0.3 is infinite at 0
    e = spec_fn(est / scale).abs().clamp_min(1e-6).pow(power)
    r = spec_fn(ref / scale).abs().pow(power)
    return (e - r).pow(2).mean((-2, -1))


def third_octave_bands(n_fft=M.N_FFT, rate=M.SAMPLE_RATE, bands=15, lowest_hz=150.0):
    """[bands, F] 0/1 matrix summing STFT power into STOI's one-third-octave bands (150 Hz to about 4.3 kHz)."""
    centres = lowest_hz * 2.0 ** (np.arange(bands) / 3)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    low, high = centres * 2 ** (-1 / 6), centres * 2 ** (1 / 6)
    return torch.from_numpy(((freqs >= low[:, None]) & (freqs < high[:, None])).astype(np.float32))


def envelope_loss(est, ref, clip_db=15.0, eps=1e-8, spec_fn=M.stft):
    """1 - STOI's intermediate intelligibility per row of [B, N]: the correlation between the clean and the
    enhanced one-third-octave band envelopes, the enhanced one scaled to the clean's energy and clipped at
    clip_db above it, averaged over the bands. STOI takes 384 ms segments; a 200 ms window is one shorter
    segment, which is all the pipeline's model sees at once. Speech that a mask drowns in residual noise or
    cuts out changes the envelope shape, which SI-SNR over a loud vowel barely weighs."""
    bands = third_octave_bands().to(est.device)
    power_r = spec_fn(ref).abs().pow(2)
    env_e = (bands @ spec_fn(est).abs().pow(2)).clamp_min(eps).sqrt()  # [B, bands, T]
    env_r = (bands @ power_r).clamp_min(eps).sqrt()
    # Like STOI, frames 40 dB or more below the loudest clean frame do not count (here: the window's loudest).
    frame = power_r.sum(1, keepdim=True)
    keep = (frame > 1e-4 * frame.amax(-1, keepdim=True)).float()  # [B, 1, T]
    count = keep.sum(-1, keepdim=True)
    env_e, env_r = env_e * keep, env_r * keep
    env_e = env_e * env_r.norm(dim=-1, keepdim=True) / (env_e.norm(dim=-1, keepdim=True) + eps)
    env_e = torch.minimum(env_e, env_r * (1 + 10 ** (clip_db / 20)))
    env_e = (env_e - env_e.sum(-1, keepdim=True) / count) * keep
    env_r = (env_r - env_r.sum(-1, keepdim=True) / count) * keep
    corr = (env_e * env_r).sum(-1) / (env_e.norm(dim=-1) * env_r.norm(dim=-1) + eps)
    return 1 - corr.mean(-1)


def enhance_windowed(net, noisy, window=SEGMENT_SAMP, batch=256, floor_hops=0,
                     crossfade_power=pipeline.CROSSFADE_POWER):
    """Whole-file enhancement the way ml_denoiser_pipeline.py does it: 50%-overlapping windows, each
    enhanced alone (with the noise floor of the last floor_hops hops), joined by the pipeline's crossfade
    (constant overlap-add, so no seams). Returns the output aligned with the input (the algorithmic delay removed)."""
    hop = window // 2
    past = M.floor_past(floor_hops, window)  # zeros in front read as silence, as at pipeline start-up
    n = noisy.shape[-1]
    frames = math.ceil(n / hop) + 1
    padded = torch.zeros(past + hop + frames * hop + hop, device=noisy.device)
    padded[past + hop:past + hop + n] = noisy
    starts = torch.arange(0, frames + 1) * hop
    wins = torch.stack([padded[s:s + past + window] for s in starts.tolist()])
    outs = []
    for i in range(0, len(wins), batch):
        outs.append(M.enhance(net, wins[i:i + batch], floor_hops, window)[0][:, -window:])
    outs = torch.cat(outs) * torch.from_numpy(dsp.crossfade_window(window, crossfade_power)).to(noisy.device)
    out = torch.zeros(hop + frames * hop + hop, device=noisy.device)
    for s, o in zip(starts.tolist(), outs):
        out[s:s + window] += o
    return out[hop:hop + n]


def enhance_file(net, noisy, arch="unet", window=SEGMENT_SAMP, floor_hops=0):
    """One whole file through the model as the pipeline runs it, aligned with the input and as long."""
    if arch == "stream":
        out = M.enhance_stream(net, noisy[None])[0][0]
        return torch.nn.functional.pad(out, (0, noisy.shape[-1] - out.shape[-1]))
    return enhance_windowed(net, noisy, window, floor_hops=floor_hops)


def model_output(net, noisy, arch="unet", window=SEGMENT_SAMP, floor_hops=0, channels_last=False):
    """(estimate, the slice of the example it stands for): the U-Net's output is its last window; the streaming
    model's is the example less the final hop its delay holds back."""
    if arch == "stream":
        est = M.enhance_stream(net, noisy)[0]
        return est, slice(0, est.shape[-1])
    return M.enhance(net, noisy, floor_hops, window, channels_last)[0][:, -window:], slice(-window, None)


def validation_set(mixer, n, seed):
    """The fixed synthetic validation windows, drawn like the training ones but plainly mixed (dataset.PLAIN:
    no babble, clipping or microphone; the default SNR range and level), so runs with other mixing options
    validate on the same windows."""
    plain = copy.copy(mixer)
    for key, value in dataset.PLAIN.items():
        if key != "snr_span":
            setattr(plain, key, value)
    return dataset.fixed_set(plain, n, seed)


@torch.no_grad()
def validate(net, val, devs, device, floor_hops=0, window=SEGMENT_SAMP, select_weight=SELECT_SNR_WEIGHT,
             arch="unet"):
    """SI-SNR on the fixed synthetic windows, and per dev set ({name: pairs}) SI-SNRi, PESQ-WB and STOI of the
    model run as the pipeline runs it; "select" is the mean over the sets of PESQ-WB + select_weight x SI-SNRi."""
    import metrics  # the same PESQ and STOI scoring as the published figures
    net.eval()
    noisy, clean = (torch.from_numpy(a).to(device) for a in val)
    outs = [model_output(net, noisy[i:i + 64], arch, window, floor_hops) for i in range(0, len(noisy), 64)]
    est, keep = torch.cat([o[0] for o in outs]), outs[0][1]
    row = {"val_si_snr": si_snr(est, clean[:, keep]).mean().item()}
    for name, pairs in devs.items():
        gains, pesqs, stois = [], [], []
        for _, nz, cl, _ in pairs:
            out = enhance_file(net, torch.from_numpy(nz).to(device), arch, window, floor_hops).cpu()
            ref = torch.from_numpy(cl)
            gains.append((si_snr(out[None], ref[None]) - si_snr(torch.from_numpy(nz)[None], ref[None])).item())
            pesqs.append(metrics.pesq_wb(cl, out.numpy())[0])
            stois.append(metrics.stoi_score(cl, out.numpy())[0])
        row[f"{name}_si_snri"] = float(np.mean(gains))
        row[f"{name}_pesq_wb"] = float(np.nanmean(pesqs))
        row[f"{name}_stoi"] = float(np.nanmean(stois))
    if devs:
        row["select"] = float(np.mean([row[f"{n}_pesq_wb"] + select_weight * row[f"{n}_si_snri"] for n in devs]))
    net.train()
    return row


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_parser():
    ap = dsp.OneLineParser(description="Train the denoiser U-Net.", allow_abbrev=False)
    names = [k for k, v in globals().items() if k.isupper() and isinstance(v, (str, int, float)) and k != "RECIPE"]
    dsp.add_constant_flags(ap, globals(), names, __file__)
    dsp.add_constant_flags(ap, vars(dataset), MIXING_NAMES, dataset.__file__)
    ap.add_argument("--init-from", nargs="+", default=[], metavar="CHECKPOINT",
                    help="checkpoint whose weights start a new run (fine-tuning); several: their average")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT_DIR/last.pt, with its recipe and length (--epochs: a longer cosine)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in this run (smoke tests)")
    return ap


# What makes a run that run: checkpoint config key -> flag. --resume takes these from last.pt, so a resumed run
# mixes, scores and schedules exactly as before; a flag given with --resume that says otherwise is refused.
RECIPE = {"arch": "arch", "stream_segment_samp": "stream_segment_samp", "hidden": "stream_hidden",
          "mask": "stream_mask", "bands": "stream_bands", "phase": "stream_phase", "head": "stream_head",
          "band_gru": "stream_band_gru", "base_ch": "base_ch",
          "window_samp": "segment_samp", "floor_hops": "floor_hops",
          "floor_start_prob": "floor_start_prob", "mag_weight": "mag_weight", "mag_power": "mag_power",
          "stoi_weight": "stoi_weight", "seed": "seed", "batch_size": "batch_size",
          "steps_per_epoch": "steps_per_epoch", "noise_exclude": "noise_exclude",
          **{key: key for key in dataset.MIXING}}


def adopt_recipe(args, argv, ck, path):
    """Set args' recipe flags, and its length unless --epochs is given, from the checkpoint being resumed. A mixing
    option an older checkpoint lacks did not exist when it was made, so that run mixed without it: it is resumed
    switched off (dataset.PLAIN), as is a streaming model from before the complex mask, bands or phase input;
    other keys it lacks keep the flag's value."""
    unset = object()  # argparse leaves a namespace's preset attributes alone unless the flag is given
    preset = argparse.Namespace(**dict.fromkeys([*RECIPE.values(), "epochs"], unset))
    parsed = build_parser().parse_args(argv, preset)
    given = {dest: value for dest, value in vars(parsed).items() if value is not unset}
    same = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else v
    # What a key's absence meant:
    before = {**dataset.PLAIN, "mask": "real", "bands": 0, "phase": False, "head": 0, "band_gru": 0}
    for key, dest in RECIPE.items():
        if key not in ck["config"]:
            if key in before and dest not in given:
                setattr(args, dest, before[key])
            continue
        saved = same(ck["config"][key])
        if dest in given and same(given[dest]) != saved:
            flag = "--" + dest.replace("_", "-")
            shown = lambda v: " ".join(f"{x:g}" for x in v) if isinstance(v, list) else v
            raise SystemExit(f"error: {path} has {key} {shown(saved)}, not {shown(same(given[dest]))}: --resume "
                             f"continues that run as it was; drop {flag}, or start a new run with --init-from")
        setattr(args, dest, tuple(saved) if isinstance(saved, list) else saved)
    if "epochs" not in given:
        # The run's length is its cosine's: without --epochs a resume finishes the schedule it started on
        # (EPOCHS would stretch it to another length); with it, the cosine stretches where the state is loaded.
        args.epochs = round(ck["scheduler"]["T_max"] / args.steps_per_epoch)


def parse_args(argv):
    """The flags, the recipe of a resumed run, and every cross-check, before anything heavy is loaded."""
    args = build_parser().parse_args(argv)
    args.resumed = None
    if args.resume:
        if args.init_from:
            raise SystemExit("error: --init-from starts a new run; --resume continues one; pick one")
        last_path = Path(args.out_dir) / "last.pt"
        if not last_path.exists():
            raise SystemExit(f"error: --resume but no checkpoint at {last_path}")
        args.resumed = torch.load(last_path, map_location="cpu", weights_only=False)
        adopt_recipe(args, argv, args.resumed, last_path)
    if args.arch not in ("unet", "stream"):
        raise SystemExit(f"error: --arch is unet or stream, not {args.arch}")
    if args.segment_samp < 2 * M.STFT_HOP_SAMP:
        raise SystemExit("error: --segment-samp must be at least two STFT hops")
    if args.arch == "stream":
        if args.floor_hops:
            raise SystemExit("error: --floor-hops is the U-Net's noise floor; the streaming model keeps its own "
                             "running mean, so drop --floor-hops with --arch stream")
        if args.stream_mask not in ("real", "complex"):
            raise SystemExit(f"error: --stream-mask is real or complex, not {args.stream_mask}")
        if args.stream_bands == 1:
            raise SystemExit("error: --stream-bands is 0 (every bin) or 2 and more")
        if args.stream_hidden % M.STREAM_GROUPS:
            raise SystemExit(f"error: --stream-hidden must be a multiple of {M.STREAM_GROUPS} (its GRU groups)")
        if args.stream_head and args.stream_mask != "real":
            raise SystemExit("error: --stream-head refines a real mask; drop it or use --stream-mask real")
        if args.stream_band_gru and not args.stream_head:
            raise SystemExit("error: --stream-band-gru sits inside the convolution head; give --stream-head too")
        args.segment_samp = args.stream_segment_samp  # one name for "the example" below
    args.mixing = {key: tuple(getattr(args, key)) if isinstance(getattr(args, key), (list, tuple))
                   else getattr(args, key) for key in dataset.MIXING}
    dataset.check_mixing(**args.mixing)
    for path in args.init_from:
        if not Path(path).exists():
            raise SystemExit(f"error: --init-from but no checkpoint at {path}")
    return args


def load_data(args, main_proc):
    """(mixer, fixed validation windows, {dev set name: pairs}, one-line summary of the data)."""
    speech, groups = dataset.load_corpus(args.speech, groups=True)
    exclude = tuple(g.strip() for g in args.noise_exclude.split(",") if g.strip())
    noise = dataset.load_corpus(args.noise, min_rms=dataset.SILENT_FILE_RMS, exclude=exclude)
    keys = []
    if args.keys and (args.keys != KEYS or Path(args.keys).is_dir()):  # the default is optional, a flag is not
        keys = dataset.load_key_events(args.keys)
    # Each example is the floor's past + the window; only the window's output is scored, as the pipeline keeps it.
    past = M.floor_past(args.floor_hops, args.segment_samp)
    mixer = dataset.Mixer(speech, noise, past + args.segment_samp, scored_samp=args.segment_samp,
                          speech_groups=groups, key_events=keys, **args.mixing)
    val = validation_set(mixer, args.val_examples, seed=args.seed + 999)
    devs = {}
    if main_proc and args.dev_files > 0:
        if args.dev:
            devs["dev"] = dataset.load_pairs(args.dev)[: args.dev_files]
        if args.dev_real and Path(args.dev_real).is_dir():
            devs["dev_real"] = dataset.load_pairs(args.dev_real)[: args.dev_files]
    hours = lambda clips: sum(len(c) for c in clips) / M.SAMPLE_RATE / 3600
    m = args.mixing
    summary = (f"speech {len(speech)} files {hours(speech):.2f} h in {len(set(groups))} sources from "
               f"{args.speech}; noise {len(noise)} files {hours(noise):.2f} h from {args.noise}"
               + (f" without {args.noise_exclude}" if exclude else "") + "; "
               f"{len(keys)} keys for typing; SNR {m['snr_range_db'][0]:g}..{m['snr_range_db'][1]:g} dB over "
               f"the {m['snr_span']}, {m['snr_focus_share']:g} of them in {m['snr_focus_db'][0]:g}.."
               f"{m['snr_focus_db'][1]:g}; speech at {m['speech_level_dbfs'][0]:g}..{m['speech_level_dbfs'][1]:g}"
               f" dBFS; babble {m['babble_prob']:g}, typing {mixer.typing_prob:g}, two noises "
               f"{m['two_noise_prob']:g}, level swing {m['level_swing_prob']:g}, mic colour "
               f"{m['mic_colour_prob']:g}, clipped {m['clip_prob']:g}")
    return mixer, val, devs, summary


def make_model(args, device, main_proc):
    """(net, optimizer, scheduler, epoch, step, best score): fresh, from --init-from, or as --resume left it."""
    torch.manual_seed(args.seed)
    in_ch = 2 if args.floor_hops else 1
    stream = args.arch == "stream"
    net = (M.StreamNet(args.stream_hidden, mask=args.stream_mask, bands=args.stream_bands, phase=args.stream_phase,
                       head=args.stream_head, band_gru=args.stream_band_gru)
           if stream
           else M.UNet(args.base_ch, in_ch))
    net = net.to(device)
    if device.type == "cpu" and not stream:
        net = net.to(memory_format=torch.channels_last)  # 1.5x faster convolutions on x86 CPUs
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * args.steps_per_epoch,
                                                       eta_min=args.lr_min)
    epoch, step, best = 0, 0, -math.inf
    if args.init_from:
        try:
            ck = M.average_checkpoints(args.init_from)
        except ValueError as exc:
            raise SystemExit(f"error: --init-from: {exc}")
        args.init_from = " ".join(args.init_from)  # as the config records it
        if ck["config"].get("arch", "unet") != args.arch:
            raise SystemExit(f"error: {args.init_from} is a {ck['config'].get('arch', 'unet')} model, not "
                             f"{args.arch}; pass --arch {ck['config'].get('arch', 'unet')}")
        if stream:
            try:
                missing, unexpected = net.load_state_dict(ck["model"], strict=False)
                # A per-band GRU added to a head model starts at zero (it adds nothing until it learns), as the
                # U-Net's noise-floor input does below; any other difference is another model.
                if unexpected or any(not k.startswith("along") for k in missing):
                    raise RuntimeError("another model")
            except RuntimeError:
                raise SystemExit(f"error: {args.init_from} is a streaming model of another width, mask, bands or "
                                 f"phase input; pass its --stream-hidden {ck['config'].get('hidden')} --stream-mask "
                                 f"{ck['config'].get('mask', 'real')} --stream-bands {ck['config'].get('bands', 0)}"
                                 f"{' --stream-phase' if ck['config'].get('phase') else ''}"
                                 f" --stream-head {ck['config'].get('head', 0)}"
                                 " (--stream-band-gru may be added to a head model)") from None
        elif ck["config"].get("base_ch", 0) != args.base_ch:
            raise SystemExit(f"error: {args.init_from} has base_ch {ck['config'].get('base_ch', 0)}, "
                             f"not {args.base_ch}")
        elif ck["model"]["e1.0.weight"].shape[1] > in_ch:
            raise SystemExit(f"error: {args.init_from} takes a noise-floor input; "
                             f"pass --floor-hops {ck['config']['floor_hops']}")
        else:  # a model without the noise-floor input starts a floor run with that input's weights at zero
            net.load_state_dict(M.widen_input(ck["model"], in_ch))
        if main_proc:
            print(f"initialised from {args.init_from} (epoch {ck.get('epoch', '?')}); new optimizer and schedule")
    if args.resumed:
        ck = args.resumed
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if sched.T_max != args.epochs * args.steps_per_epoch:  # --epochs raised on resume: the cosine stretches
            sched.T_max = args.epochs * args.steps_per_epoch
            # The scheduler updates the rate recursively from its last value, which at the end of a finished
            # cosine is the floor and would stay there: restart it where the longer cosine stands at this step.
            for group, base in zip(opt.param_groups, sched.base_lrs):
                cosine = (1 + math.cos(math.pi * ck["step"] / sched.T_max)) / 2
                group["lr"] = args.lr_min + (base - args.lr_min) * cosine
            sched._last_lr = [g["lr"] for g in opt.param_groups]
        epoch, step, best = ck["epoch"], ck["step"], ck["best"]
        args.init_from = ck["config"].get("init_from", "")  # a resumed fine-tune still started from there
        if main_proc:
            print(f"resumed from {Path(args.out_dir) / 'last.pt'}: epoch {epoch}, step {step}, best score {best:.3f}")
    return net, opt, sched, epoch, step, best


def make_batch(args, mixer, rng):
    """A fresh batch of (noisy, clean) examples; runs in a helper thread while the previous step trains."""
    noisy, clean = mixer.batch(rng, args.batch_size)
    if args.floor_hops:  # zeros before a random start: what the pipeline holds in its first 2 s
        for i in np.flatnonzero(rng.random(len(noisy)) < args.floor_start_prob):
            noisy[i, :rng.integers(1, args.floor_hops) * (args.segment_samp // 2)] = 0.0
    return noisy, clean


def training_step(args, train_net, net, opt, sched, batch, device, autocast):
    """One optimizer step on a batch from make_batch; returns the loss."""
    noisy, clean = (torch.from_numpy(a).to(device) for a in batch)
    with autocast:
        est, keep = model_output(train_net, noisy, args.arch, args.segment_samp, args.floor_hops,
                                 device.type == "cpu")
    clean, noisy = clean[:, keep], noisy[:, keep]
    loss = si_snr_loss(est, clean)
    spec_fn = stream_stft if args.arch == "stream" else M.stft
    if args.mag_weight:
        loss = loss + args.mag_weight * compressed_mag_loss(est, clean, noisy, args.mag_power, spec_fn).mean()
    if args.stoi_weight:
        loss = loss + args.stoi_weight * envelope_loss(est, clean, spec_fn=spec_fn).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def recipe_config(args, data_summary):
    stream = args.arch == "stream"
    geometry = ({"n_fft": M.STREAM_N_FFT, "stft_hop_samp": M.STREAM_HOP_SAMP, "window_samp": M.STREAM_N_FFT,
                 "stream_segment_samp": args.segment_samp, "hidden": args.stream_hidden, "mask": args.stream_mask,
                 "bands": args.stream_bands, "phase": args.stream_phase, "head": args.stream_head,
                 "band_gru": args.stream_band_gru}
                if stream else
                {"n_fft": M.N_FFT, "stft_hop_samp": M.STFT_HOP_SAMP, "window_samp": args.segment_samp})
    return {"arch": args.arch, "base_ch": args.base_ch, **geometry, "sample_rate": M.SAMPLE_RATE, "context_samp": 0,
            "log_eps": M.LOG_EPS, "floor_hops": args.floor_hops, "init_from": args.init_from or "",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in args.mixing.items()},
            "loss": "si-snr", "mag_weight": args.mag_weight, "mag_power": args.mag_power,
            "stoi_weight": args.stoi_weight, "floor_start_prob": args.floor_start_prob, "seed": args.seed,
            "batch_size": args.batch_size, "steps_per_epoch": args.steps_per_epoch,
            "noise_exclude": args.noise_exclude, "data": data_summary}


def write_log(log_path, row, is_best=False):
    new_log = not log_path.exists()
    with open(log_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new_log:
            w.writeheader()
        w.writerow(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
          + (" *best*" if is_best else ""), flush=True)


def save_atomically(obj, path):
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # a kill mid-save never corrupts what was there


def main(argv=None):
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device()
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    main_proc = rank == 0
    out = Path(args.out_dir)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "train_log.csv"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    mixer, val, devs, data_summary = load_data(args, main_proc)
    net, opt, sched, epoch, step, best = make_model(args, device, main_proc)
    train_net = net
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    # bf16 autocast on CUDA roughly doubles throughput; the STFT, iSTFT and loss stay in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if main_proc and step == 0:  # the untrained baseline, so the log shows what training bought
        base = {"epoch": 0, "step": 0, "train_loss": float("nan"), "lr": args.lr, "audio_s_per_s": float("nan"),
                "epoch_minutes": 0.0}
        base.update(validate(net, val, devs, device, args.floor_hops, args.segment_samp, args.select_snr_weight,
                             args.arch))
        write_log(log_path, base)

    from tqdm import tqdm
    prefetch = concurrent.futures.ThreadPoolExecutor(1)
    steps_this_run = 0
    while epoch < args.epochs:
        # Each epoch draws from its own seed, so a resumed run sees the same data as an uninterrupted one.
        rng = np.random.default_rng([args.seed, epoch, rank])
        t0, losses = time.time(), []
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_proc,
                   leave=False, dynamic_ncols=True)
        # Mixing the next batch overlaps the step (numpy and torch release the GIL); one rng, drawn in order.
        pending = prefetch.submit(make_batch, args, mixer, rng)
        for _ in bar:
            batch = pending.result()
            pending = prefetch.submit(make_batch, args, mixer, rng)
            losses.append(training_step(args, train_net, net, opt, sched, batch, device, autocast))
            step += 1
            steps_this_run += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if args.max_steps and steps_this_run >= args.max_steps:
                break
        finished_epoch = len(losses) == args.steps_per_epoch
        epoch += finished_epoch
        stop = bool(args.max_steps and steps_this_run >= args.max_steps)
        if not main_proc:
            if stop:
                break
            continue
        secs = time.time() - t0
        row = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
               "audio_s_per_s": len(losses) * args.batch_size * args.segment_samp / M.SAMPLE_RATE / secs,
               "epoch_minutes": secs / 60}
        row.update(validate(net, val, devs, device, args.floor_hops, args.segment_samp, args.select_snr_weight,
                             args.arch))
        score = row.get("select", row["val_si_snr"])
        is_best = score > best
        best = max(best, score)
        config = recipe_config(args, data_summary)
        weights = {"model": net.state_dict(), "config": config, "metrics": row, "epoch": epoch, "step": step}
        save_atomically(dict(weights, optimizer=opt.state_dict(), scheduler=sched.state_dict(), best=best),
                        last_path)
        if args.keep_epochs and finished_epoch:
            save_atomically(weights, out / f"epoch{epoch}.pt")
        if is_best:
            save_atomically(weights, best_path)
        write_log(log_path, row, is_best)
        if stop:
            break
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
