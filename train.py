"""Train the denoiser's U-Net (model.py) on clean speech + noise mixed on the fly (dataset.py).

    python train.py                                   # ../shared/data/train, checkpoints in ./checkpoints
    python train.py --resume                          # carry on from checkpoints/last.pt, as it was started
    python train.py --init-from checkpoints/best.pt --context-samp 3200 --out-dir checkpoints/context
                                                      # fine-tune with 200 ms of past audio before each window
    python train.py --init-from checkpoints/utterance2/best.pt --snr-span utterance --floor-hops 20 \
        --out-dir checkpoints/floor                   # fine-tune with a 2 s noise-floor input channel
    python train.py --speech DNS/clean --noise DNS/noise   # the layout download_dataset.py writes
    torchrun --nproc_per_node=4 train.py              # several GPUs (DistributedDataParallel)

Then `python export_model.py` turns checkpoints/best.pt into denoiser.onnx.

What the model learns on is exactly what the live pipeline feeds it: one 3200-sample (200 ms) window (after
CONTEXT_SAMP samples of past audio, whose output is not scored, or with FLOOR_HOPS the noise floor of the
last 2 s as a second input channel, if set), a 512-point Hann STFT with
128-sample hops and center=True (26 frames), log-magnitude in, mask out. The loss
is SI-SNR of the waveform rebuilt from mask x noisy magnitude with the noisy phase, so the model is judged
on the audio a listener hears, phase errors included, rather than on a magnitude it never outputs.
Validation each epoch: SI-SNR on a fixed synthetic set, and SI-SNR improvement, PESQ-WB and STOI on the paired
dev sets (DEV_DIR and the real recordings of DEV_REAL_DIR) run through the pipeline's 50%-overlap windowing;
best.pt keeps the epoch with the best mean over both sets (SELECT_SNR_WEIGHT), and each epoch is kept too.
Runs on CUDA (bf16 autocast), Apple MPS or CPU, picked automatically. Constants below; flags override.
"""
import argparse
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

SPEECH_DIR = "../shared/data/train/speech"   # clean speech, searched recursively
NOISE_DIR = "../shared/data/train/noise"     # noise recordings, searched recursively
KEYS_DIR = "../shared/data/train/noise_events/keyboard"  # key one-shots for typing noise ("" for none)
DEV_DIR = "../shared/data/dev"               # paired clean/ and noisy/ for validation ("" to skip)
DEV_REAL_DIR = "../shared/data/dev_real"     # real recorded pairs, validated beside DEV_DIR ("" or absent: skip)
OUT_DIR = "checkpoints"                      # last.pt, best.pt and train_log.csv go here
SEGMENT_SAMP = 3200        # training window; 3200 = the pipeline's window (longer segments lost ~1 dB on it)
CONTEXT_SAMP = 0           # past samples before each window (noise memory), 0 = spec; 3200 was no better on dev
FLOOR_HOPS = 0             # noise floor over this many 100 ms hops as a second input channel (0 = spec, 20 = 2 s)
FLOOR_START_PROB = 0.25    # with FLOOR_HOPS, share of examples whose past is cut short, as after start-up
INIT_FROM = ""             # start from this checkpoint's weights with a fresh optimizer and schedule (fine-tuning)
BATCH_SIZE = 64            # windows per step; 64 x 0.2 s = 12.8 s of audio
EPOCHS = 50                # the cosine schedule spans all of them
STEPS_PER_EPOCH = 200      # mixing is dynamic, so an "epoch" is a step count; 200 is ~4 min on 2 CPU cores
LR = 1e-3                  # Adam start; lower to 5e-4 if the loss jumps about
LR_MIN = 1e-5              # cosine annealing floor
LOSS = "si-snr"            # per-window loss: "si-snr" (spec) or "snr", which also scores the window's level
                           # (as a fine-tune it lost 0.3 dB SI-SNRi and 0.06 PESQ-WB on dev in 2 epochs)
MAG_WEIGHT = 0.0           # weight of a compressed-magnitude term added to the loss (0 = spec); 25 as a fine-tune
                           # gave +0.05 PESQ-WB, +0.004 STOI, -0.16 dB SI-SNRi on dev, OVRL unchanged (README)
MAG_POWER = 0.3            # that term compares |STFT|^MAG_POWER; lower weighs quiet bins more (consonants, residue)
STOI_WEIGHT = 0.0          # weight of a short-time intelligibility term (1 - STOI's envelope correlation) added
                           # to the loss (0 = spec); raise it to trade SI-SNR for intelligibility at low SNR
PAUSE_FLOOR_DB = -30.0     # a pause window's loss is its output/input energy in dB, floored here; lower = quieter pauses
EMA_DECAY = 0.0            # validate/keep a running average of the weights (0 = off, spec); 0.999 ~ last 1000 steps
GRAD_CLIP = 5.0            # max gradient norm; SI-SNR gradients spike on near-silent windows
VAL_EXAMPLES = 256         # fixed synthetic validation windows
DEV_FILES = 40             # pairs of each dev set scored each epoch (0 = none); PESQ-WB costs ~0.3 s a file
SELECT_SNR_WEIGHT = 0.1    # best.pt maximises the mean over the dev sets of PESQ-WB + this x SI-SNRi (dB):
                           # 0.1 values 1 dB of noise removed as much as 0.1 PESQ; raise it to favour removal
KEEP_EPOCHS = True         # also keep each epoch's weights as epochN.pt, to compare epochs with the full chain
SEED = 1234                # data and init seed; each DDP rank offsets it
NUM_THREADS = 0            # CPU threads for torch; 0 = all cores
BASE_CH = M.BASE_CH        # U-Net width; see model.py


def si_snr(est, ref, eps=1e-8):
    """Scale-invariant SNR in dB per row of [B, N]. Zero-mean first: a DC offset is not speech."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps) * ref
    noise = est - proj
    return 10 * torch.log10(proj.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


def si_snr_loss(est, ref):
    return -si_snr(est, ref).mean()


def snr(est, ref, eps=1e-8):
    """Plain SNR in dB per row of [B, N]: like si_snr, but a wrong level counts as error."""
    return 10 * torch.log10(ref.pow(2).sum(-1) / ((est - ref).pow(2).sum(-1) + eps) + eps)


def window_loss(est, ref, noisy, pause_floor_db=PAUSE_FLOOR_DB, loss=LOSS):
    """-SI-SNR (or -SNR, LOSS) on windows with speech. SI-SNR is undefined without speech, so a pause window
    (ref all zeros, dataset.PAUSE_PROB) scores how much of its input noise comes out, in dB, down to
    pause_floor_db: both terms are in dB, so neither kind of window swamps the other's gradient."""
    has_speech = ref.pow(2).sum(-1) > 0
    leak = est.pow(2).sum(-1) / (noisy.pow(2).sum(-1) + 1e-8)
    pause = 10 * torch.log10(leak + 10 ** (pause_floor_db / 10))
    score = si_snr(est, ref) if loss == "si-snr" else snr(est, ref)
    return torch.where(has_speech, -score, pause).mean()


def compressed_mag_loss(est, ref, noisy, power=MAG_POWER):
    """Mean squared error of |STFT|^power per row of [B, N] (Braun & Tashev 2021). SI-SNR is ruled by the loud
    vowels; the compression lifts quiet bins (consonants, the noise left in pauses) that decide intelligibility
    and how clean the background sounds. Both signals are divided by the input's RMS, so the term does not
    depend on the mixture's level, and it is defined on pause windows (ref all zeros) too."""
    scale = noisy.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8
    # clamp: the gradient of x^0.3 is infinite at 0
    e = M.stft(est / scale).abs().clamp_min(1e-6).pow(power)
    r = M.stft(ref / scale).abs().pow(power)
    return (e - r).pow(2).mean((-2, -1))


def third_octave_bands(n_fft=M.N_FFT, rate=M.SAMPLE_RATE, bands=15, lowest_hz=150.0):
    """[bands, F] 0/1 matrix summing STFT power into STOI's one-third-octave bands (150 Hz to about 4.3 kHz)."""
    centres = lowest_hz * 2.0 ** (np.arange(bands) / 3)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    low, high = centres * 2 ** (-1 / 6), centres * 2 ** (1 / 6)
    return torch.from_numpy(((freqs >= low[:, None]) & (freqs < high[:, None])).astype(np.float32))


def envelope_loss(est, ref, clip_db=15.0, eps=1e-8):
    """1 - STOI's intermediate intelligibility per row of [B, N]: the correlation between the clean and the
    enhanced one-third-octave band envelopes, the enhanced one scaled to the clean's energy and clipped at
    clip_db above it, averaged over the bands. STOI takes 384 ms segments; a 200 ms window is one shorter
    segment, which is all the pipeline's model sees at once. Speech that a mask drowns in residual noise or
    cuts out changes the envelope shape, which SI-SNR over a loud vowel barely weighs."""
    bands = third_octave_bands().to(est.device)
    power_r = M.stft(ref).abs().pow(2)
    env_e = (bands @ M.stft(est).abs().pow(2)).clamp_min(eps).sqrt()  # [B, bands, T]
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


def enhance_windowed(net, noisy, window=SEGMENT_SAMP, context=0, batch=256, floor_hops=0,
                     crossfade_power=pipeline.CROSSFADE_POWER):
    """Whole-file enhancement the way ml_denoiser_pipeline.py does it: 50%-overlapping windows, each
    enhanced alone (with `context` samples of the past in front, whose output is dropped, or the noise floor
    of the last floor_hops hops), joined by the pipeline's crossfade (constant overlap-add, so no seams).
    Returns the output aligned with the input (the pipeline's algorithmic delay removed)."""
    hop = window // 2
    if floor_hops:
        context = M.floor_past(floor_hops, window)  # zeros in front read as silence, as at pipeline start-up
    n = noisy.shape[-1]
    frames = math.ceil(n / hop) + 1
    padded = torch.zeros(context + hop + frames * hop + hop, device=noisy.device)
    padded[context + hop:context + hop + n] = noisy
    starts = torch.arange(0, frames + 1) * hop
    wins = torch.stack([padded[s:s + context + window] for s in starts.tolist()])
    outs = []
    for i in range(0, len(wins), batch):
        outs.append(M.enhance(net, wins[i:i + batch], floor_hops, window)[0][:, -window:])
    outs = torch.cat(outs) * torch.from_numpy(dsp.crossfade_window(window, crossfade_power)).to(noisy.device)
    out = torch.zeros(hop + frames * hop + hop, device=noisy.device)
    for s, o in zip(starts.tolist(), outs):
        out[s:s + window] += o
    return out[hop:hop + n]


def validation_set(mixer, n, seed):
    """The fixed synthetic validation windows, drawn like the training ones but never pauses (SI-SNR needs
    speech in every window: on silence it reads a meaningless -80 dB), never augmented and always at the
    default SNR range and level (so runs with other mixing options validate on the same windows)."""
    plain = copy.copy(mixer)
    for key, value in dataset.PLAIN.items():
        if key != "snr_span":
            setattr(plain, key, value)
    return dataset.fixed_set(plain, n, seed)


@torch.no_grad()
def validate(net, val, devs, device, context=0, floor_hops=0, window=SEGMENT_SAMP):
    """SI-SNR on the fixed synthetic windows, and per dev set ({name: pairs}) SI-SNRi, PESQ-WB and STOI of the
    model run as the pipeline runs it; "select" is the mean over the sets of PESQ-WB + SELECT_SNR_WEIGHT x SI-SNRi."""
    net.eval()
    noisy, clean = (torch.from_numpy(a).to(device) for a in val)
    est = torch.cat([M.enhance(net, noisy[i:i + 64], floor_hops, window)[0][:, -window:]
                     for i in range(0, len(noisy), 64)])
    row = {"val_si_snr": si_snr(est, clean[:, -window:]).mean().item()}
    if devs:
        import metrics  # the same PESQ and STOI scoring as the published figures
    for name, pairs in devs.items():
        gains, pesqs, stois = [], [], []
        for _, nz, cl, _ in pairs:
            out = enhance_windowed(net, torch.from_numpy(nz).to(device), window, context, floor_hops=floor_hops).cpu()
            ref = torch.from_numpy(cl)
            gains.append((si_snr(out[None], ref[None]) - si_snr(torch.from_numpy(nz)[None], ref[None])).item())
            pesqs.append(metrics.pesq_wb(cl, out.numpy())[0])
            stois.append(metrics.stoi_score(cl, out.numpy())[0])
        row[f"{name}_si_snri"] = float(np.mean(gains))
        row[f"{name}_pesq_wb"] = float(np.nanmean(pesqs))
        row[f"{name}_stoi"] = float(np.nanmean(stois))
    if devs:
        row["select"] = float(np.mean([row[f"{n}_pesq_wb"] + SELECT_SNR_WEIGHT * row[f"{n}_si_snri"] for n in devs]))
    net.train()
    return row


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# Mixing options whose flag is not simply the option's name.
MIXING_FLAGS = {"snr_range_db": "snr_range", "snr_focus_db": "snr_focus", "speech_level_dbfs": "speech_level"}


def build_parser():
    ap = argparse.ArgumentParser(description="Train the denoiser U-Net.", allow_abbrev=False)
    ap.add_argument("--speech", default=SPEECH_DIR)
    ap.add_argument("--noise", default=NOISE_DIR)
    ap.add_argument("--dev", default=DEV_DIR, help="paired dev set (clean/ noisy/); '' to skip")
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--segment-samp", type=int, default=SEGMENT_SAMP)
    ap.add_argument("--context-samp", type=int, default=CONTEXT_SAMP)
    ap.add_argument("--floor-hops", type=int, default=FLOOR_HOPS, help="noise-floor input over K hops (FLOOR_HOPS)")
    ap.add_argument("--floor-start-prob", type=float, default=FLOOR_START_PROB)
    ap.add_argument("--init-from", nargs="+", default=[INIT_FROM] if INIT_FROM else [],
                    help="checkpoint whose weights start a new run (fine-tuning); several: their average")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--lr-min", type=float, default=LR_MIN)
    ap.add_argument("--ema-decay", type=float, default=EMA_DECAY, help="weight averaging (EMA_DECAY), 0 = off")
    ap.add_argument("--grad-clip", type=float, default=GRAD_CLIP)
    ap.add_argument("--keys", default=KEYS_DIR, help="keyboard one-shots for typing noise; '' for none")
    ap.add_argument("--dev-real", default=DEV_REAL_DIR, help="real recorded pairs validated beside --dev; '' to skip")
    for key, default in dataset.MIXING.items():  # one flag per mixing option, named after dataset.py's constant
        flag = "--" + MIXING_FLAGS.get(key, key).replace("_", "-")
        help = f"dataset.{key.upper()}"
        if isinstance(default, str):
            ap.add_argument(flag, dest=key, choices=["window", "utterance"], default=default, help=help)
        elif isinstance(default, tuple):
            kind = int if all(isinstance(v, int) for v in default) else float
            ap.add_argument(flag, dest=key, type=kind, nargs=2, default=default, metavar=("LOW", "HIGH"), help=help)
        else:
            ap.add_argument(flag, dest=key, type=float, default=default, help=help)
    ap.add_argument("--loss", choices=["si-snr", "snr"], default=LOSS, help="per-window loss (LOSS)")
    ap.add_argument("--mag-weight", type=float, default=MAG_WEIGHT, help="compressed-magnitude term (MAG_WEIGHT)")
    ap.add_argument("--mag-power", type=float, default=MAG_POWER)
    ap.add_argument("--stoi-weight", type=float, default=STOI_WEIGHT, help="intelligibility term (STOI_WEIGHT)")
    ap.add_argument("--pause-floor-db", type=float, default=PAUSE_FLOOR_DB)
    ap.add_argument("--val-examples", type=int, default=VAL_EXAMPLES)
    ap.add_argument("--dev-files", type=int, default=DEV_FILES)
    ap.add_argument("--base-ch", type=int, default=BASE_CH)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--num-threads", type=int, default=NUM_THREADS)
    ap.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in this run (smoke tests)")
    return ap


# What makes a run that run: checkpoint config key -> flag. --resume takes these from last.pt, so a resumed run
# mixes, scores and schedules exactly as before; a flag given with --resume that says otherwise is refused.
RECIPE = {"base_ch": "base_ch", "window_samp": "segment_samp", "context_samp": "context_samp",
          "floor_hops": "floor_hops", "floor_start_prob": "floor_start_prob", "pause_floor_db": "pause_floor_db",
          "loss": "loss", "mag_weight": "mag_weight", "mag_power": "mag_power", "stoi_weight": "stoi_weight",
          "ema_decay": "ema_decay", "seed": "seed", "batch_size": "batch_size", "steps_per_epoch": "steps_per_epoch",
          **{key: key for key in dataset.MIXING}}


def adopt_recipe(args, argv, ck, path):
    """Set args' recipe flags from the checkpoint being resumed. A mixing option an older checkpoint lacks did
    not exist when it was made, so that run mixed without it: it is resumed switched off (dataset.PLAIN); other
    keys it lacks keep the flag's value."""
    unset = object()  # argparse leaves a namespace's preset attributes alone unless the flag is given
    parsed = build_parser().parse_args(argv, argparse.Namespace(**dict.fromkeys(RECIPE.values(), unset)))
    given = {dest: value for dest, value in vars(parsed).items() if value is not unset}
    same = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else v
    for key, dest in RECIPE.items():
        if key not in ck["config"]:
            if key in dataset.PLAIN and dest not in given:
                setattr(args, dest, dataset.PLAIN[key])
            continue
        saved = same(ck["config"][key])
        if dest in given and same(given[dest]) != saved:
            flag = "--" + dest.replace("_", "-")
            shown = lambda v: " ".join(f"{x:g}" for x in v) if isinstance(v, list) else v
            raise SystemExit(f"error: {path} has {key} {shown(saved)}, not {shown(same(given[dest]))}: --resume "
                             f"continues that run as it was; drop {flag}, or start a new run with --init-from")
        setattr(args, dest, tuple(saved) if isinstance(saved, list) else saved)


def main(argv=None):
    args = build_parser().parse_args(argv)
    resumed = None
    if args.resume:
        if args.init_from:
            raise SystemExit("error: --init-from starts a new run; --resume continues one; pick one")
        last_path = Path(args.out_dir) / "last.pt"
        if not last_path.exists():
            raise SystemExit(f"error: --resume but no checkpoint at {last_path}")
        resumed = torch.load(last_path, map_location="cpu", weights_only=False)
        adopt_recipe(args, argv, resumed, last_path)
    if args.context_samp < 0 or args.segment_samp < 2 * M.STFT_HOP_SAMP:
        raise SystemExit("error: --context-samp must be >= 0 and --segment-samp at least two STFT hops")
    if args.floor_hops < 0 or (args.floor_hops and args.context_samp) or not 0 <= args.floor_start_prob <= 1:
        raise SystemExit("error: --floor-hops must be >= 0, not combined with --context-samp (the floor's hops "
                         "are the context), and --floor-start-prob in [0, 1]")
    # Past audio in front of each training window: the context, or the floor's earlier hops.
    past = M.floor_past(args.floor_hops, args.segment_samp) if args.floor_hops else args.context_samp
    if not 0.0 <= args.ema_decay < 1.0:
        raise SystemExit(f"error: --ema-decay must be in [0, 1), not {args.ema_decay}")
    mixing = {key: tuple(getattr(args, key)) if isinstance(getattr(args, key), (list, tuple)) else getattr(args, key)
              for key in dataset.MIXING}
    dataset.check_mixing(**mixing)
    if args.mag_weight < 0 or not 0 < args.mag_power <= 2 or args.stoi_weight < 0:
        raise SystemExit("error: --mag-weight and --stoi-weight must be >= 0 and --mag-power in (0, 2]")
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

    speech, groups = dataset.load_corpus(args.speech, groups=True)
    noise = dataset.load_corpus(args.noise, min_rms=dataset.SILENT_FILE_RMS)
    keys = []
    if args.keys and (args.keys != KEYS_DIR or Path(args.keys).is_dir()):  # the default is optional, a flag is not
        keys = dataset.load_key_events(args.keys)
    # Each example is context + window long; only the window's output is scored, as the pipeline only keeps it.
    mixer = dataset.Mixer(speech, noise, past + args.segment_samp, scored_samp=args.segment_samp,
                          speech_groups=groups, key_events=keys, **mixing)
    val = validation_set(mixer, args.val_examples, seed=args.seed + 999)
    devs = {}
    if main_proc and args.dev_files > 0:
        if args.dev:
            devs["dev"] = dataset.load_pairs(args.dev)[: args.dev_files]
        if args.dev_real and Path(args.dev_real).is_dir():
            devs["dev_real"] = dataset.load_pairs(args.dev_real)[: args.dev_files]
    hours = lambda clips: sum(len(c) for c in clips) / M.SAMPLE_RATE / 3600
    data_summary = (f"speech {len(speech)} files {hours(speech):.2f} h in {len(set(groups))} sources from "
                    f"{args.speech}; noise {len(noise)} files {hours(noise):.2f} h from {args.noise}; "
                    f"{len(keys)} keys for typing; SNR {args.snr_range_db[0]:g}..{args.snr_range_db[1]:g} dB over "
                    f"the {args.snr_span}, {args.snr_focus_share:g} of them in {args.snr_focus_db[0]:g}.."
                    f"{args.snr_focus_db[1]:g}; speech at {args.speech_level_dbfs[0]:g}..{args.speech_level_dbfs[1]:g}"
                    f" dBFS; babble {args.babble_prob:g}, typing {mixer.typing_prob:g}, two noises "
                    f"{args.two_noise_prob:g}, level swing {args.level_swing_prob:g}, mic colour "
                    f"{args.mic_colour_prob:g}, clipped {args.clip_prob:g}, pause windows {args.pause_prob:g}")

    torch.manual_seed(args.seed)
    in_ch = 2 if args.floor_hops else 1
    net = M.UNet(args.base_ch, in_ch).to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)  # 1.5x faster convolutions on x86 CPUs
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    total_steps = args.epochs * args.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=args.lr_min)
    epoch, step, best = 0, 0, -math.inf

    if args.init_from:
        for path in args.init_from:
            if not Path(path).exists():
                raise SystemExit(f"error: --init-from but no checkpoint at {path}")
        try:
            ck = M.average_checkpoints(args.init_from)
        except ValueError as exc:
            raise SystemExit(f"error: --init-from: {exc}")
        args.init_from = " ".join(args.init_from)  # as the config records it
        # A model without the noise-floor input starts a floor run with that input's weights at zero.
        if ck["config"].get("base_ch", 0) != args.base_ch:
            raise SystemExit(f"error: {args.init_from} has base_ch {ck['config'].get('base_ch', 0)}, "
                             f"not {args.base_ch}")
        if ck["model"]["e1.0.weight"].shape[1] > in_ch:
            raise SystemExit(f"error: {args.init_from} takes a noise-floor input; "
                             f"pass --floor-hops {ck['config']['floor_hops']}")
        net.load_state_dict(M.widen_input(ck["model"], in_ch))
        if main_proc:
            print(f"initialised from {args.init_from} (epoch {ck.get('epoch', '?')}); new optimizer and schedule")
    if args.resume:
        ck = resumed
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sched.T_max = total_steps  # --epochs may be raised on resume: the cosine stretches to the new end
        epoch, step, best = ck["epoch"], ck["step"], ck["best"]
        args.init_from = ck["config"].get("init_from", "")  # a resumed fine-tune still started from there
        if main_proc:
            print(f"resumed from {last_path}: epoch {epoch}, step {step}, best score {best:.3f}")
    # The weights' running average sits in a flatter spot than the last step's weights; with it on, it is what
    # validation scores and best.pt keeps, while training carries on with the raw weights.
    ema = None
    if args.ema_decay:
        ema = copy.deepcopy(net)
        if args.resume and "ema" in ck:
            ema.load_state_dict(ck["ema"])
        ema.requires_grad_(False)
        # state_dict tensors share storage with the modules, so the pairs are listed once and updated in place.
        ema_pairs = list(zip(ema.state_dict().values(), net.state_dict().values()))
    scored = ema if ema is not None else net
    train_net = net
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    # bf16 autocast on CUDA roughly doubles throughput; the STFT, iSTFT and loss stay in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def log(row, is_best=False):
        new_log = not log_path.exists()
        with open(log_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new_log:
                w.writeheader()
            w.writerow(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
              + (" *best*" if is_best else ""), flush=True)

    if main_proc and step == 0:  # the untrained baseline, so the log shows what training bought
        base = {"epoch": 0, "step": 0, "train_loss": float("nan"), "lr": args.lr, "audio_s_per_s": float("nan"),
                "epoch_minutes": 0.0}
        base.update(validate(scored, val, devs, device, args.context_samp, args.floor_hops, args.segment_samp))
        log(base)

    from tqdm import tqdm
    steps_this_run = 0
    while epoch < args.epochs:
        # Each epoch draws from its own seed, so a resumed run sees the same data as an uninterrupted one.
        rng = np.random.default_rng([args.seed, epoch, rank])
        t0, losses = time.time(), []
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_proc,
                   leave=False, dynamic_ncols=True)
        for _ in bar:
            noisy, clean = mixer.batch(rng, args.batch_size)
            if args.floor_hops:  # zeros before a random start: what the pipeline holds in its first 2 s
                for i in np.flatnonzero(rng.random(len(noisy)) < args.floor_start_prob):
                    noisy[i, :rng.integers(1, args.floor_hops) * (args.segment_samp // 2)] = 0.0
            noisy, clean = torch.from_numpy(noisy).to(device), torch.from_numpy(clean).to(device)
            with autocast:
                est, _ = M.enhance(train_net, noisy, args.floor_hops, args.segment_samp, device.type == "cpu")
            w = args.segment_samp
            loss = window_loss(est[:, -w:], clean[:, -w:], noisy[:, -w:], args.pause_floor_db, args.loss)
            if args.mag_weight:
                loss = loss + args.mag_weight * compressed_mag_loss(est[:, -w:], clean[:, -w:], noisy[:, -w:],
                                                                    args.mag_power).mean()
            if args.stoi_weight:  # pause windows have no speech envelope to follow
                speech = clean[:, -w:].pow(2).sum(-1) > 0
                loss = loss + args.stoi_weight * envelope_loss(est[speech, -w:], clean[speech, -w:]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in ema_pairs:
                        if e.is_floating_point():  # BatchNorm's running stats are averaged too; its step count is not
                            e.lerp_(p, 1.0 - args.ema_decay)
                        else:
                            e.copy_(p)
            step += 1
            steps_this_run += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if args.max_steps and steps_this_run >= args.max_steps:
                break
        finished_epoch = len(losses) == args.steps_per_epoch
        epoch += finished_epoch
        if not main_proc:
            if args.max_steps and steps_this_run >= args.max_steps:
                break
            continue
        secs = time.time() - t0
        row = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
               "audio_s_per_s": len(losses) * args.batch_size * args.segment_samp / M.SAMPLE_RATE / secs,
               "epoch_minutes": secs / 60}
        row.update(validate(scored, val, devs, device, args.context_samp, args.floor_hops, args.segment_samp))
        score = row.get("select", row["val_si_snr"])
        is_best = score > best
        best = max(best, score)
        config = {"base_ch": args.base_ch, "n_fft": M.N_FFT, "stft_hop_samp": M.STFT_HOP_SAMP,
                  "sample_rate": M.SAMPLE_RATE, "window_samp": args.segment_samp, "log_eps": M.LOG_EPS,
                  "context_samp": args.context_samp, "floor_hops": args.floor_hops,
                  "init_from": args.init_from or "", **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in mixing.items()},
                  "pause_floor_db": args.pause_floor_db, "loss": args.loss,
                  "mag_weight": args.mag_weight, "mag_power": args.mag_power, "stoi_weight": args.stoi_weight,
                  "ema_decay": args.ema_decay, "floor_start_prob": args.floor_start_prob, "seed": args.seed,
                  "batch_size": args.batch_size, "steps_per_epoch": args.steps_per_epoch, "data": data_summary}
        ck = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "epoch": epoch, "step": step, "best": best, "config": config, "metrics": row}
        if ema is not None:
            ck["ema"] = ema.state_dict()
        torch.save(ck, last_path.with_suffix(".tmp"))
        os.replace(last_path.with_suffix(".tmp"), last_path)  # a kill mid-save never corrupts last.pt
        if KEEP_EPOCHS and finished_epoch:
            torch.save({"model": scored.state_dict(), "config": config, "metrics": row, "epoch": epoch, "step": step},
                       out / f"epoch{epoch}.pt")
        if is_best:
            torch.save({"model": scored.state_dict(), "config": config, "metrics": row, "epoch": epoch, "step": step},
                       best_path.with_suffix(".tmp"))
            os.replace(best_path.with_suffix(".tmp"), best_path)
        log(row, is_best)
        if args.max_steps and steps_this_run >= args.max_steps:
            break
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
