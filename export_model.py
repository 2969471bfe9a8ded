"""Export a training checkpoint to the ONNX model the pipeline runs (denoiser.onnx).

    python export_model.py                                  # the shipped model again (equal to float32 rounding)
    python export_model.py --checkpoint checkpoints/last.pt --output my.onnx
    python export_model.py --int8                           # also denoiser.int8.onnx, with its cost and gain
    python export_model.py --checkpoint a.pt b.pt           # the average of two fine-tunes' weights
    python export_model.py --checkpoint checkpoints/stream/best.pt --output denoiser_lowlatency.onnx

The graph takes log|STFT| [1, 1, 257, T] with T free (the pipeline feeds 26 frames, 51 with 3200 samples
of context) and returns the mask; a model trained with --floor-hops takes a second channel, the noise floor
(model.noise_floor), and says so in its metadata (floor_hops, silent_log) for the pipeline to build it.
Before writing, onnxruntime is checked against torch on random and on real input (max abs difference must
stay below PARITY_TOL), and the file gets metadata the pipeline checks on load: sample rate, n_fft, hop,
window, context (past samples the model expects in front of each window), base channels, a summary of
the training data, and the dev metrics of the checkpoint.
A streaming checkpoint (train.py --arch stream) exports one frame's step instead: log|X| [1, 257] and the state
[1, state_size] in, the mask [1, 257] (or [1, 2, 257], real and imaginary, with metadata mask=complex) and the
next state out, with metadata kind=stream, its frame geometry, the window (sqrt-hann) and the state's size and
layout; parity is checked frame by frame against the whole-utterance torch pass on real audio.
"""
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import model as M

CHECKPOINT = "checkpoints/stoi6b/epoch4.pt"  # what to export: the shipped model's weights (docs/TRAINING.md)
OUTPUT = "denoiser.onnx"            # where the pipeline looks by default
OPSET = 17                          # [17, 99] ONNX opset; 17 is the oldest with everything the graph needs
PARITY_TOL = 1e-4                   # [0, 1] max |onnxruntime - torch| on the mask; larger means a broken export
DEV = "../shared/data/dev"          # real input for the parity check and the --int8 PESQ comparison ('' to skip)
INT8 = False                        # also write a dynamically quantized INT8 model, with its size, speed and PESQ
INT8_DEV_FILES = 10                 # [1, 10000] dev pairs scored for the INT8 quality change


def load_checkpoint(path):
    """One checkpoint, or a list of them whose weights are averaged (model.average_checkpoints)."""
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"error: checkpoint not found: {p} (train one with `python train.py`)")
    try:
        ck = M.average_checkpoints(paths)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    cfg = ck.get("config", {})
    if cfg.get("arch") == "stream":
        if cfg.get("phase"):
            raise SystemExit(f"error: {paths[0]} takes the noisy phase as input (--stream-phase), which the "
                             "pipeline does not feed yet; it can be trained and validated, not exported")
        net = M.StreamNet(cfg.get("hidden", M.STREAM_HIDDEN), mask=cfg.get("mask", "real"),
                          bands=cfg.get("bands", 0), head=cfg.get("head", 0), band_gru=cfg.get("band_gru", 0))
        net.load_state_dict(ck["model"])
        return net.eval(), ck
    net = M.UNet(cfg.get("base_ch", M.BASE_CH), in_ch=ck["model"]["e1.0.weight"].shape[1])
    net.load_state_dict(ck["model"])
    return net.eval(), ck


def export(net, path, metadata, opset=OPSET):
    """Write net to ONNX with a free time axis (the U-Net) or as one frame's step (the streaming model) and
    string metadata, atomically."""
    import onnx
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent if path.parent.exists() else None)
    os.close(fd)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports these plain graphs in 1 s where the dynamo
        # exporter takes 17 s for the same graph and the same numbers.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # nn.GRU's "batch_first with a given h0" notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # nn.GRU checks h0's shape in Python: fixed here
        if isinstance(net, M.StreamNet):
            dummy = (torch.randn(1, net.bins) - 5, torch.zeros(1, net.state_size))
            torch.onnx.export(M.StreamStep(net), dummy, tmp, input_names=["logmag", "state"],
                              output_names=["mask", "state_out"], opset_version=opset, dynamo=False)
        else:
            dummy = torch.randn(1, net.in_ch, M.N_FFT // 2 + 1, 26)
            torch.onnx.export(net, (dummy,), tmp, input_names=["logmag"], output_names=["mask"],
                              opset_version=opset, dynamic_axes={"logmag": {3: "frames"}, "mask": {3: "frames"}},
                              dynamo=False)
    proto = onnx.load(tmp)
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), v if isinstance(v, str) else json.dumps(v)
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return path


def base_metadata(net, ck=None):
    cfg = (ck or {}).get("config", {})
    if isinstance(net, M.StreamNet):
        meta = {"kind": "stream", "sample_rate": M.SAMPLE_RATE, "n_fft": M.STREAM_N_FFT,
                "stft_hop_samp": M.STREAM_HOP_SAMP, "window_samp": M.STREAM_N_FFT, "window": "sqrt-hann",
                "hidden": net.hidden, "state_size": net.state_size,
                "state_layout": f"running mean {net.width} + gru1 {net.hidden} + gru2 {net.hidden}"
                                + (f" + per-band gru {net.width} x {net.band_gru}" if net.band_gru else ""),
                "log_eps": M.LOG_EPS, "parameters": M.count_parameters(net), "producer": "export_model.py"}
        if net.mask != "real":  # absent means real: the files from before the complex mask
            meta["mask"] = net.mask
        if net.bands:  # absent means every bin; the pipeline needs neither (the ONNX graph pools and spreads)
            meta["bands"] = net.bands
        if net.head:  # absent means none; inside the graph too
            meta["head"] = net.head
        if net.band_gru:  # absent means none
            meta["band_gru"] = net.band_gru
    else:
        meta = {"sample_rate": M.SAMPLE_RATE, "n_fft": M.N_FFT, "stft_hop_samp": M.STFT_HOP_SAMP,
                "window_samp": cfg.get("window_samp", 3200), "context_samp": cfg.get("context_samp", 0),
                "base_ch": net.base_ch, "log_eps": M.LOG_EPS,
                "parameters": M.count_parameters(net), "producer": "export_model.py"}
    if ck:
        meta["training_data"] = cfg.get("data", "unknown")
        meta["epoch"] = ck.get("epoch", 0)
        if cfg.get("init_from"):  # a fine-tune's epochs count from the checkpoint it started from
            meta["init_from"] = cfg["init_from"]
        if cfg.get("loss", "si-snr") != "si-snr":  # absent = the spec's SI-SNR (keeps older exports byte-identical)
            meta["loss"] = cfg["loss"]
        if cfg.get("mag_weight"):  # absent = no magnitude term (keeps older exports byte-identical)
            meta["mag_weight"], meta["mag_power"] = cfg["mag_weight"], cfg["mag_power"]
        if cfg.get("stoi_weight"):
            meta["stoi_weight"] = cfg["stoi_weight"]
        meta["step"] = ck.get("step", 0)
        if ck.get("averaged_from"):  # an average was never validated as one checkpoint: no dev metrics
            meta["averaged_from"] = ck["averaged_from"]
        else:
            meta["dev_metrics"] = {k: round(v, 4) for k, v in ck.get("metrics", {}).items() if isinstance(v, float)}
    if getattr(net, "in_ch", 1) > 1:  # absent = no floor input (keeps older exports byte-identical)
        meta["floor_hops"] = cfg.get("floor_hops", 0)
        meta["silent_log"] = M.SILENT_LOG
    return meta


def real_logmag(dev_dir, frames=26):
    """Features of a real dev recording, so parity is checked on speech and noise, not only on randn."""
    import soundfile as sf
    files = sorted(Path(dev_dir, "noisy").glob("*.wav")) if dev_dir else []
    if not files:
        return None
    audio, _ = sf.read(files[0], dtype="float32")
    x = torch.from_numpy(audio[: M.STFT_HOP_SAMP * (frames - 1) * 4])
    return M.log_magnitude(M.stft(x[None]))


def with_floor(logmag, in_ch):
    """A floor-input model's second channel for the parity check: a plausible floor (each bin's minimum)."""
    if in_ch == 1:
        return logmag
    return torch.cat([logmag, logmag.amin(-1, keepdim=True).expand_as(logmag)], 1)


def stream_parity(net, sess, dev_dir):
    """Frame by frame through onnxruntime, the state fed back, against the whole-utterance torch pass."""
    import soundfile as sf
    files = sorted(Path(dev_dir, "noisy").glob("*.wav")) if dev_dir else []
    audio = sf.read(files[0], dtype="float32")[0][:4 * M.SAMPLE_RATE] if files else None
    inputs = [("random", torch.randn(1, 200, net.bins) * 2 - 5)]
    if audio is not None:
        inputs.append(("real dev audio", M.stream_log_magnitude(M.stream_frames(torch.from_numpy(audio)[None]))))
    worst = 0.0
    for name, logmag in inputs:
        with torch.no_grad():
            ref = net(logmag)[0].numpy()
        state = np.zeros((1, net.state_size), np.float32)
        got = []
        for frame in logmag[0].numpy():
            mask, state = sess.run(None, {"logmag": frame[None], "state": state})
            got.append(mask[0])
        diff = float(np.abs(np.stack(got) - ref).max())
        worst = max(worst, diff)
        print(f"parity {name}, {len(got)} frames one at a time: max |onnx - torch| = {diff:.2e}")
    return worst


def check_parity(net, path, dev_dir=DEV, tol=PARITY_TOL):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(net, M.StreamNet):
        worst = stream_parity(net, sess, dev_dir)
        if worst >= tol:
            raise SystemExit(f"error: ONNX output differs from torch by {worst:.2e} (tolerance {tol:g}); not trusted")
        return worst
    c = net.in_ch
    inputs = [("random T=26", torch.randn(1, c, 257, 26) * 3 - 5), ("random T=7", torch.randn(1, c, 257, 7))]
    real = real_logmag(dev_dir)
    if real is not None:
        inputs.append(("real dev audio", with_floor(real, c)))
    worst = 0.0
    for name, x in inputs:
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {"logmag": x.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        print(f"parity {name}: max |onnx - torch| = {diff:.2e}")
    if worst >= tol:
        raise SystemExit(f"error: ONNX output differs from torch by {worst:.2e} (tolerance {tol:g}); not trusted")
    return worst


def int8_report(fp32_path, int8_path, dev_dir, n_files):
    """Quantize weights to INT8 (dynamic) and print size, hop time and dev PESQ change."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    import ml_denoiser_pipeline as P
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    rows = []
    for label, path in (("fp32", fp32_path), ("int8", int8_path)):
        cfg = P.default_config(model=str(path))
        chain = P.MLChain(cfg, model_only=True)
        times = []
        x = np.random.default_rng(0).standard_normal(chain.hop_samp).astype(np.float32) * 0.03
        for i in range(60):
            t = time.perf_counter()
            chain.hop(x)
            times.append(time.perf_counter() - t)
        row = {"model": label, "MB": Path(path).stat().st_size / 1e6, "hop_ms": 1000 * float(np.median(times[10:]))}
        if dev_dir:
            import dataset
            from pesq import pesq
            pairs = dataset.load_pairs(dev_dir)[:n_files]
            row["pesq_wb"] = float(np.mean([pesq(M.SAMPLE_RATE, cl, P.denoise_array(nz, str(path)), "wb")
                                            for _, nz, cl, _ in pairs]))
        rows.append(row)
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if "pesq_wb" in rows[0]:
        change = rows[1]["pesq_wb"] - rows[0]["pesq_wb"]
        print(f"INT8 PESQ-WB change on {n_files} dev pairs (full chain): {change:+.3f}")
    return rows


def main(argv=None):
    import dsp
    ap = dsp.OneLineParser(description="Export a checkpoint to ONNX.", allow_abbrev=False)
    ap.add_argument("--checkpoint", nargs="+", default=[CHECKPOINT],
                    help="checkpoint to export; several: their weights are averaged (fine-tunes of one model)")
    dsp.add_constant_flags(ap, globals(), ["OUTPUT", "OPSET", "PARITY_TOL", "DEV", "INT8", "INT8_DEV_FILES"],
                           __file__)
    args = ap.parse_args(argv)
    dev = args.dev if args.dev and Path(args.dev).is_dir() else ""
    net, ck = load_checkpoint(args.checkpoint)
    if args.int8 and isinstance(net, M.StreamNet):
        raise SystemExit("error: --int8 is for the U-Net (INT8 was slower than float32 on this CPU)")
    path = export(net, args.output, base_metadata(net, ck), args.opset)
    check_parity(net, path, dev, args.parity_tol)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {M.count_parameters(net) / 1e6:.2f} M parameters)")
    if args.int8:
        int8_path = Path(args.output).with_suffix(".int8.onnx")
        int8_report(path, int8_path, dev, args.int8_dev_files)
        print(f"wrote {int8_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
