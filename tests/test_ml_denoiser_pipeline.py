"""ML chain: overlap-add identity, streaming == one-shot, file mode, bad input, benchmark."""
import numpy as np
import pytest
import soundfile as sf

import dsp
import ml_denoiser_pipeline as P
from conftest import REPO, run_script, speechlike, tone


def transparent_config(model):
    """Mask forced to 1 by the model; EQ, gate and gains out of the way."""
    return P.default_config(model=str(model), eq=False, gate=False, input_gain=1.0, output_gain=1.0)


def test_documented_shape_and_latency(random_model):
    cfg = P.default_config(model=str(random_model))
    chain = P.MLChain(cfg)
    assert chain.stft.frames == 26  # 1 + 3200 / 128 with center=True
    assert chain.latency_samples == 3200 and P.latency_ms() == 200.0


@pytest.mark.parametrize("crossfade_power", [P.CROSSFADE_POWER, 1.0, 3.0])
def test_overlap_add_identity(ones_model, crossfade_power):
    chain = P.MLChain(dsp.with_overrides(transparent_config(ones_model), {"crossfade_power": crossfade_power}))
    x = speechlike(3.0, dbfs=-20)
    y = np.concatenate([chain.process(x[i:i + 512]) for i in range(0, len(x), 512)])
    d = chain.latency_samples
    err = y[d:] - x[:-d]
    assert 10 * np.log10(np.sum(err ** 2) / np.sum(x[:-d] ** 2)) < -60
    assert np.abs(y[:d]).max() < 1e-6  # nothing comes out before the first window is complete


@pytest.mark.parametrize("block", [1, 37, 160, 512, 1600, 4096])
def test_streaming_equals_one_shot(random_model, block):
    cfg = P.default_config(model=str(random_model))
    x = speechlike(1.2, seed=3) + 0.01 * np.random.default_rng(4).standard_normal(19200).astype(np.float32)
    one_shot = P.MLChain(cfg).process(x)
    chain = P.MLChain(cfg)
    streamed = np.concatenate([chain.process(x[i:i + block]) for i in range(0, len(x), block)])
    assert np.abs(streamed - one_shot).max() <= 1e-6


def test_model_only_matches_torch_windowed_inference(random_model, random_net):
    """The pipeline runs the model exactly as train.py validates it, so dev metrics in the training log
    carry over to the pipeline."""
    torch = pytest.importorskip("torch")
    import train
    x = speechlike(1.5, seed=5)
    with torch.no_grad():
        ref = train.enhance_windowed(random_net, torch.from_numpy(x)).numpy()
    got = P.denoise_array(x, str(random_model), model_only=True)
    assert np.abs(got - ref).max() < 1e-4


@pytest.fixture(scope="module")
def floor_model(tmp_path_factory):
    """A random U-Net with the noise-floor input (base_ch 8), exported for a 4-hop floor."""
    torch = pytest.importorskip("torch")
    import export_model
    import model
    torch.manual_seed(1)
    net = model.UNet(8, in_ch=2).eval()
    path = tmp_path_factory.mktemp("models") / "floor.onnx"
    return net, export_model.export(net, path, dict(export_model.base_metadata(net), floor_hops=4))


def test_floor_model_matches_torch(floor_model):
    """The pipeline's streaming floor (numpy) equals model.noise_floor as train.py validates with it, through
    a stretch of digital silence (skipped by the floor) and a change of noise level (the floor follows)."""
    torch = pytest.importorskip("torch")
    import train
    net, path = floor_model
    rng = np.random.default_rng(9)
    x = speechlike(3.0, seed=8) + 0.02 * rng.standard_normal(48000).astype(np.float32)
    x[8000:16000] = 0.0
    x[32000:] += 0.1 * rng.standard_normal(16000).astype(np.float32)
    with torch.no_grad():
        ref = train.enhance_windowed(net, torch.from_numpy(x), floor_hops=4).numpy()
        other_floor = train.enhance_windowed(net, torch.from_numpy(x), floor_hops=2).numpy()
    got = P.denoise_array(x, str(path), model_only=True)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got - other_floor).max() > 1e-3  # the floor's memory really reaches the model
    chain = P.MLChain(P.default_config(model=str(path)))
    assert chain.stft.frames == 26 and chain.latency_samples == 3200  # memory costs no latency


def test_floor_model_streams_like_one_shot(floor_model):
    cfg = P.default_config(model=str(floor_model[1]))
    x = speechlike(2.4, seed=7) + 0.01 * np.random.default_rng(8).standard_normal(38400).astype(np.float32)
    one_shot = P.MLChain(cfg).process(x)
    chain = P.MLChain(cfg)
    streamed = np.concatenate([chain.process(x[i:i + 333]) for i in range(0, len(x), 333)])
    assert np.abs(streamed - one_shot).max() <= 1e-6


def test_file_mode_44k_stereo(tmp_path, random_model):
    rate = 44100
    x = np.stack([speechlike(2.0, rate=rate), speechlike(2.0, rate=rate, seed=1)], axis=1)
    sf.write(tmp_path / "in.wav", x, rate)
    r = run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "in.wav", "--output", tmp_path / "out.wav",
                   "--model", random_model)
    assert r.returncode == 0, r.stderr
    info = sf.info(tmp_path / "out.wav")
    assert (info.samplerate, info.channels, info.frames) == (rate, 1, len(x))


def test_file_mode_aligned_with_input(tmp_path, ones_model):
    """Output sample n belongs to input sample n: with a transparent chain the file comes back unchanged."""
    x = speechlike(2.0, dbfs=-20)
    sf.write(tmp_path / "in.wav", x, 16000, subtype="FLOAT")
    r = run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "in.wav", "--output", tmp_path / "out.wav",
                   "--model", ones_model, "--no-eq", "--no-gate", "--input-gain", 1, "--output-gain", 1)
    assert r.returncode == 0, r.stderr
    y, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert len(y) == len(x) and np.abs(y - x).max() < 1e-3


def test_folder_mode(tmp_path, random_model):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        sf.write(src / f"f{i}.wav", speechlike(0.5, seed=i), 16000)
    (src / "readme.txt").write_text("not audio")
    r = run_script("ml_denoiser_pipeline.py", "--input", src, "--output", tmp_path / "out", "--model", random_model)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.wav", "f1.wav", "f2.wav"]


def test_output_never_overwrites_the_input(tmp_path, random_model):
    """--output naming the input (directly, through a folder, or a path that resolves to it) and a folder run
    writing into its own input folder are refused before anything is read; the user's files are unchanged."""
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "talk.wav", speechlike(0.5), 16000)
    before = (src / "talk.wav").read_bytes()
    model = ("--model", random_model)
    for out in (src / "talk.wav", src, src / ".." / "in" / "talk.wav"):
        one_line_error(run_script("ml_denoiser_pipeline.py", "--input", src / "talk.wav", "--output", out, *model),
                       "it would be overwritten")
    for out in (src, src / "denoised"):
        one_line_error(run_script("ml_denoiser_pipeline.py", "--input", src, "--output", out, *model),
                       "inside the input folder")
    assert (src / "talk.wav").read_bytes() == before and sorted(p.name for p in src.iterdir()) == ["talk.wav"]


def test_folder_run_with_a_bad_file_fails_and_names_it(tmp_path, random_model):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        sf.write(src / f"f{i}.wav", speechlike(0.5, seed=i), 16000)
    (src / "broken.wav").write_bytes(b"RIFF not really a wave file")
    r = run_script("ml_denoiser_pipeline.py", "--input", src, "--output", tmp_path / "out", "--model", random_model)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: 1 file(s) failed: broken.wav" in r.stderr and "wrote 2 of 3 files" in r.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.wav", "f1.wav"]


def test_settings_outside_their_range_are_refused(tmp_path, random_model):
    """Every tunable with a documented [low, high] is held to it, from the command line and from code."""
    sf.write(tmp_path / "ok.wav", tone(440, 0.5), 16000)
    io = ("--input", tmp_path / "ok.wav", "--output", tmp_path / "out.wav", "--model", random_model)
    for flag, value, message in (("--spectral-floor", "-1", "must be in 0..1, not -1"),
                                 ("--input-gain", "-5", "must be in 0.01..10, not -5"),
                                 ("--mask-power", "0", "must be in 0.1..4"),
                                 ("--phase-iters", "1.5", "takes a whole number"),
                                 ("--gate-depth-db", "lots", "takes a number")):
        r = run_script("ml_denoiser_pipeline.py", *io, flag, value)
        one_line_error(r, message)
        assert r.returncode == 2 and flag in r.stderr
    assert not (tmp_path / "out.wav").exists()
    with pytest.raises(dsp.AudioError, match="SPECTRAL_FLOOR must be in 0..1"):
        P.default_config(spectral_floor=1.5)
    parser = P.build_parser()
    ranged = {a.dest for a in parser._actions if a.dest in parser.constant_ranges}
    numeric = {k.lower() for k, v in vars(P).items() if k.isupper() and k not in P.NOT_FLAGS
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert ranged == numeric  # not one numeric tunable without its range


def test_interrupted_folder_run_leaves_only_whole_files(tmp_path, random_model):
    """Ctrl+C in the middle of a folder run: what is in the output folder is complete, nothing half-written."""
    import signal
    import subprocess
    import sys
    import time
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(30):
        sf.write(src / f"f{i:02d}.wav", speechlike(2.0, seed=i), 16000)
    proc = subprocess.Popen([sys.executable, str(REPO / "ml_denoiser_pipeline.py"), "--input", str(src), "--output",
                             str(out), "--model", str(random_model)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and len(list(out.glob("f*.wav"))) >= 3) and time.monotonic() < deadline:  # no .tmp
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    written = sorted(out.iterdir())
    assert 3 <= len(written) < 30 and all(p.suffix == ".wav" for p in written)  # no temporary left behind
    for p in written:
        assert sf.info(p).frames == 32000


def one_line_error(r, pattern):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], r.stderr


def test_bad_inputs(tmp_path, random_model):
    out = tmp_path / "out.wav"
    base = ("--output", out, "--model", random_model)
    one_line_error(run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "missing.wav", *base), "not found")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt garbage" * 10)
    one_line_error(run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "corrupt.wav", *base), "cannot read")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    one_line_error(run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "empty.wav", *base), "empty")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4 not audio")
    one_line_error(run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "doc.pdf", *base), "cannot read")
    sf.write(tmp_path / "ok.wav", tone(440, 0.5), 16000)
    one_line_error(run_script("ml_denoiser_pipeline.py", "--input", tmp_path / "ok.wav", "--output",
                              tmp_path / "o.xyz", "--model", random_model), "unknown output format")
    assert not out.exists()


def test_missing_and_mismatched_models(tmp_path, tiny_onnx_factory):
    sf.write(tmp_path / "ok.wav", tone(440, 0.5), 16000)
    args = ("--input", tmp_path / "ok.wav", "--output", tmp_path / "out.wav")
    r = run_script("ml_denoiser_pipeline.py", *args, "--model", tmp_path / "none.onnx")
    one_line_error(r, "model not found")
    assert "train.py" in r.stderr
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", tmp_path / "broken.onnx"),
                   "cannot load model")
    wrong_bins = tiny_onnx_factory(tmp_path / "bins.onnx", bins=129)
    one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", wrong_bins), "expected [1, 1, 257, T]")
    wrong_rate = tiny_onnx_factory(tmp_path / "rate.onnx", metadata={"sample_rate": 48000})
    one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", wrong_rate), "sample_rate=48000")
    for bad in ("-3200", "lots", "1600"):  # a model that wants context is refused, as one with a malformed field
        bad_context = tiny_onnx_factory(tmp_path / "context.onnx", metadata={"context_samp": bad})
        one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", bad_context), "context_samp")
    for bad in ("-1", "many"):
        bad_floor = tiny_onnx_factory(tmp_path / "floor.onnx", metadata={"floor_hops": bad})
        one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", bad_floor), "bad floor_hops")
    one_input = tiny_onnx_factory(tmp_path / "floor1.onnx", metadata={"floor_hops": 20})  # no floor channel
    one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", one_input), "expected [1, 2, 257, T]")
    bad_silence = tiny_onnx_factory(tmp_path / "silence.onnx", metadata={"silent_log": "quiet"})
    one_line_error(run_script("ml_denoiser_pipeline.py", *args, "--model", bad_silence), "bad silent_log")
    assert not (tmp_path / "out.wav").exists()


def test_nan_input_warns_and_continues(random_model, capsys):
    cfg = P.default_config(model=str(random_model))
    x = speechlike(1.0)
    x[5000:5100] = np.nan
    x[9000] = np.inf
    y = dsp.process_offline(P.MLChain(cfg), x)
    assert np.isfinite(y).all() and len(y) == len(x)
    assert capsys.readouterr().err.count("warning") == 1


def test_unknown_flag_is_an_error():
    r = run_script("ml_denoiser_pipeline.py", "--spectral-flor", "0.2")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_bench_prints_figures(random_model):
    r = run_script("ml_denoiser_pipeline.py", "--bench", "--model", random_model)
    assert r.returncode == 0, r.stderr
    for key in ("median", "p99", "real-time factor", "algorithmic latency: 200 ms"):
        assert key in r.stdout


GOLDEN = REPO / "tests" / "golden_metrics.json"


def test_shipped_model_keeps_its_published_scores(dev_dir):
    """Golden-metric regression: the shipped denoiser.onnx, run through the current chain on a few dev pairs,
    must reproduce the per-file scores recorded by the evaluation run that produced README's table."""
    import hashlib
    import json
    import evaluate as ev
    golden = json.loads(GOLDEN.read_text())
    model = REPO / golden["model"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == golden["model_sha256"], (
        "denoiser.onnx is not the model the published figures were measured on: re-run the evaluate.py "
        "command in README.md (it rewrites tests/golden_metrics.json)")
    for name, methods in golden["files"].items():
        noisy, _ = sf.read(dev_dir / "noisy" / f"{name}.wav", dtype="float32")
        clean, _ = sf.read(dev_dir / "clean" / f"{name}.wav", dtype="float32")
        for key, want in methods.items():
            out = P.denoise_array(noisy, str(model), model_only=key == "ml-model")
            aligned, lag = ev.align(out, clean)
            assert lag == 0  # file mode is aligned by construction
            pesq = ev.pesq_wb(clean, aligned)[0]
            si_snri = ev.si_snr(aligned, clean) - ev.si_snr(noisy, clean)
            assert abs(pesq - want["pesq"]) < 0.02, (name, key, pesq, want)
            assert abs(si_snri - want["si_snri"]) < 0.1, (name, key, si_snri, want)


def test_mask_power_deepens_a_partial_mask(tmp_path, tiny_onnx_factory):
    """MASK_POWER 2 turns the model's 0.5 into 0.25 (-6 dB more), the floor still bounds it from below, the
    model-only output ignores it, and a power that would invert or flatten the mask is refused."""
    model = tiny_onnx_factory(tmp_path / "half.onnx", value=0.5)
    x = speechlike(2.0, dbfs=-20)
    d = 3200

    def gain(**kw):
        cfg = P.default_config(**{"model": str(model), "gate": False, "input_gain": 1.0, "output_gain": 1.0,
                                  "spectral_floor": 0.0, **kw})
        y = P.MLChain(cfg).process(x)
        return np.sqrt(np.mean(y[d:] ** 2) / np.mean(x[:-d] ** 2))

    assert gain(mask_power=1.0) == pytest.approx(0.5, rel=0.02)
    assert gain() == pytest.approx(0.5 ** P.MASK_POWER, rel=0.02)  # the default applies
    assert gain(mask_power=2.0) == pytest.approx(0.25, rel=0.02)
    assert gain(mask_power=2.0, spectral_floor=0.4) == pytest.approx(0.4, rel=0.02)
    cfg = P.default_config(model=str(model), mask_power=2.0)
    y = P.MLChain(cfg, model_only=True).process(x)
    assert np.sqrt(np.mean(y[d:] ** 2) / np.mean(x[:-d] ** 2)) == pytest.approx(0.5, rel=0.02)
    for bad in (0.0, -1.0):
        with pytest.raises(dsp.AudioError, match="MASK_POWER must be"):
            P.MLChain(P.default_config(model=str(model), mask_power=bad))


def test_crossfade_averages_the_two_windows_more_evenly(tmp_path, tiny_onnx_factory):
    """A mask that differs between the two windows covering a sample (the model sees it in different
    places) is blended by the crossfade: a lower CROSSFADE_POWER gives the window whose edge the sample
    sits near more weight than Hann would, and a power that would break the blend is refused."""
    rng = np.random.default_rng(3)
    x = 0.1 * rng.standard_normal(32000).astype(np.float32)
    older_half = np.zeros((1, 1, 1, 26), np.float32)  # the mask passes the window's older 13 frames only
    older_half[..., :13] = 1.0
    model = tiny_onnx_factory(tmp_path / "alternating.onnx", value=older_half)
    outs = {}
    for p in (1.0, 0.3):
        cfg = dsp.with_overrides(transparent_config(model), {"crossfade_power": p})
        outs[p] = P.MLChain(cfg).process(x)
    d = 3200
    # Each window's mask passes its older half and cuts its newer half, so a sample keeps only the weight
    # of the window in whose older half it sits: w(t), t its place there. Measured away from the mask's
    # step (smeared by the 512-point STFT frames), 100 samples at a time over the 18 windows.
    t = np.arange(len(x) - d) % 1600
    for p, y in outs.items():
        w = dsp.crossfade_window(3200, p)
        for lo in range(300, 1300, 100):
            sel = (t >= lo) & (t < lo + 100)
            got = np.sum(y[d:][sel] * x[:-d][sel] * np.tile(w[lo:lo + 100], 18)) / np.sum(x[:-d][sel] ** 2)
            assert got == pytest.approx(np.mean(w[lo:lo + 100] ** 2), abs=0.01), (p, lo)
    hann_w, flat_w = dsp.crossfade_window(3200, 1.0), dsp.crossfade_window(3200, 0.3)
    assert np.all(np.abs(flat_w[200:1400] - 0.5) <= np.abs(hann_w[200:1400] - 0.5))  # flatter: nearer even
    for bad in (0.0, -0.5):
        with pytest.raises(dsp.AudioError, match="CROSSFADE_POWER must be"):
            P.MLChain(dsp.with_overrides(transparent_config(model), {"crossfade_power": bad}))


def test_phase_rounds_bring_the_output_closer_to_the_masked_magnitude():
    """A mask changes bins independently, so the masked spectrum is not the STFT of any signal: the output's
    own STFT misses the magnitude the mask asked for. Each Griffin-Lim round of PHASE_ITERS shrinks that miss."""
    stft = dsp.WindowSTFT(3200, 512, 128)
    rng = np.random.default_rng(5)
    x = (0.1 * rng.standard_normal(3200) + tone(440, 0.2, amp=0.3)).astype(np.float32)
    spec = stft.forward(x)
    mask = (rng.random(spec.shape) > 0.5).astype(np.float32)  # as inconsistent as a mask gets
    target = np.abs(spec) * mask

    def miss(iters):
        y = P.consistent(stft, stft.inverse(spec * mask), target, iters)
        return np.linalg.norm(np.abs(stft.forward(y)) - target) / np.linalg.norm(target)

    misses = [miss(k) for k in range(4)]
    assert all(later < earlier for earlier, later in zip(misses, misses[1:])), misses
    assert misses[3] < 0.95 * misses[0], misses
    assert P.consistent(stft, x, np.abs(spec), 3) == pytest.approx(x, abs=1e-5)  # a consistent one stays put


def test_phase_rounds_only_in_the_full_chain(tmp_path):
    """Model-only output stays the model's own (noisy phase, as train.py validates); bad counts are refused."""
    model = _level_mask_model(tmp_path / "level.onnx")
    x = speechlike(1.2, seed=2) + 0.01 * np.random.default_rng(6).standard_normal(19200).astype(np.float32)
    runs = {k: P.MLChain(dsp.with_overrides(transparent_config(model), {"phase_iters": k, "pause_depth_db": 0}))
            .process(x) for k in (0, 2)}
    assert np.abs(runs[2] - runs[0]).max() > 1e-3
    only = [P.MLChain(P.default_config(model=str(model), phase_iters=k), model_only=True).process(x) for k in (0, 2)]
    assert np.array_equal(only[0], only[1])
    for bad in (-1, 1.5):
        with pytest.raises(dsp.AudioError, match="PHASE_ITERS must be"):
            P.MLChain(P.default_config(model=str(model), phase_iters=bad))


def _level_mask_model(path):
    """An ONNX model whose mask passes loud bins and cuts quiet ones: sigmoid(2 * logmag)."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("logmag", TensorProto.FLOAT, [1, 1, 257, "T"])
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 257, "T"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["logmag", "two"], ["z"]), helper.make_node("Sigmoid", ["z"], ["mask"])]
    proto = helper.make_model(helper.make_graph(nodes, "level_mask", [x], [y], initializer=[two]),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return path


def test_pause_cut_turns_down_only_what_the_mask_calls_noise(tmp_path, tiny_onnx_factory):
    """PAUSE_DEPTH_DB cuts a hop by its full depth when the mask passes less than PAUSE_BELOW_DB of the noisy
    energy, leaves a hop alone above PAUSE_ABOVE_DB, and leaves speech after a pause untouched."""
    def gain(model, x, start, stop, **kw):
        cfg = P.default_config(**{"model": str(model), "gate": False, "input_gain": 1.0, "output_gain": 1.0,
                                  "spectral_floor": 0.0, "mask_power": 1.0, **kw})
        y = P.dsp.process_offline(P.MLChain(cfg), x)
        return np.sqrt(np.mean(y[start:stop] ** 2) / np.mean(x[start:stop] ** 2))

    x = speechlike(3.0, dbfs=-20)
    for value, cut_db in ((0.5, 0.0), (0.03, 10.0)):  # shares of -6 dB (speech) and -30 dB (noise only)
        model = tiny_onnx_factory(tmp_path / f"c{value}.onnx", value=value)
        assert gain(model, x, 8000, 40000, pause_depth_db=10.0) == pytest.approx(
            value * 10 ** (-cut_db / 20), rel=0.02)
    # Quiet noise for 2 s, then a loud tone over it: the noise is cut by the full depth up to the hop before
    # the tone (whose last STFT frame already hears it), and from the tone's second hop on nothing is cut.
    rate = 16000
    rng = np.random.default_rng(1)
    x = (0.003 * rng.standard_normal(4 * rate)).astype(np.float32)
    x[2 * rate:] += tone(440, 2.0, amp=0.3)
    model = _level_mask_model(tmp_path / "level.onnx")
    pause = gain(model, x, rate // 2, 2 * rate - 1600, pause_depth_db=12.0)
    assert pause == pytest.approx(gain(model, x, rate // 2, 2 * rate - 1600, pause_depth_db=0.0) * 10 ** (-12 / 20),
                                  rel=0.02)
    speech = gain(model, x, 2 * rate + 1600, 4 * rate, pause_depth_db=12.0)
    assert speech == pytest.approx(gain(model, x, 2 * rate + 1600, 4 * rate, pause_depth_db=0.0), rel=1e-3)
    # Model-only output never takes the cut; settings that would boost or invert it are refused.
    cfg = P.default_config(model=str(model), pause_depth_db=12.0)
    y = P.dsp.process_offline(P.MLChain(cfg, model_only=True), x)
    assert np.allclose(y, P.dsp.process_offline(P.MLChain(P.default_config(model=str(model)), model_only=True), x))
    for bad in ({"pause_depth_db": -3.0}, {"pause_below_db": -10.0, "pause_above_db": -12.0}):
        with pytest.raises(dsp.AudioError, match="PAUSE_DEPTH_DB must be"):
            P.MLChain(P.default_config(model=str(model), **bad))


def test_pause_cut_closes_over_pause_release_hops(tmp_path):
    """After speech the cut does not fall at once but over PAUSE_RELEASE hops, a steady step in dB per hop,
    so weak hops inside a word that the model calls noise are dimmed, not dropped; 0 hops is refused."""
    rate, hop = 16000, 1600
    rng = np.random.default_rng(1)
    x = (0.003 * rng.standard_normal(4 * rate)).astype(np.float32)
    x[:2 * rate] += tone(440, 2.0, amp=0.3)  # speech (the mask passes it) for 2 s, then noise only
    model = _level_mask_model(tmp_path / "level.onnx")

    def hop_gains_db(**kw):
        cfg = dict(model=str(model), gate=False, input_gain=1.0, output_gain=1.0, spectral_floor=0.0)
        ref = P.dsp.process_offline(P.MLChain(P.default_config(**cfg, pause_depth_db=0.0)), x)
        y = P.dsp.process_offline(P.MLChain(P.default_config(**cfg, pause_depth_db=12.0, **kw)), x)
        y, ref = (a[:len(x) // hop * hop].reshape(-1, hop) for a in (y, ref))
        return 10 * np.log10(np.mean(y ** 2, axis=1) / np.mean(ref ** 2, axis=1))

    at_once = hop_gains_db(pause_release=1)
    first_cut = int(np.argmax(at_once < -11.9))  # the first hop the immediate cut has fully closed on
    assert 15 < first_cut < 25 and np.allclose(at_once[:first_cut - 1], 0.0, atol=0.05)
    assert np.allclose(at_once[first_cut:], -12.0, atol=0.05)
    slow = hop_gains_db(pause_release=5)
    assert np.allclose(slow[:first_cut - 1], 0.0, atol=0.05)  # speech untouched
    steps = np.diff(slow[first_cut - 1:first_cut + 4])
    assert np.all(steps < -1.5) and np.all(steps > -3.0)  # about 12 dB / 5 per hop
    assert slow[first_cut + 3] > -11.5 and np.allclose(slow[first_cut + 5:], -12.0, atol=0.05)
    with pytest.raises(dsp.AudioError, match="PAUSE_RELEASE must be"):
        P.MLChain(P.default_config(model=str(model), pause_release=0))


# --- the low-latency streaming model (StreamChain) ---

def stream_config(model, **overrides):
    return P.default_config(low_latency=True, model_low_latency=str(model), **overrides)


def error_db(got, ref):
    """Error energy against the reference's, dB (an exact match reads -300, not -inf)."""
    return 10 * np.log10(max(np.sum((got - ref) ** 2) / np.sum(ref ** 2), 1e-30))


def test_stream_chain_is_picked_by_metadata_and_has_32_ms_latency(stream_model):
    chain = P.make_chain(stream_config(stream_model))
    assert isinstance(chain, P.StreamChain) and chain.hop_samp == 256 and chain.latency_samples == 512
    assert P.latency_ms(stream_config(stream_model)) == 32.0
    assert isinstance(P.make_chain(P.default_config(model=str(stream_model))), P.StreamChain)


@pytest.mark.parametrize("block", [1, 37, 255, 256, 257, 1000, 4096, "fuzz"])
def test_stream_frames_one_at_a_time_equal_the_whole_utterance_in_torch(stream_model, stream_net, block):
    """ONNX Runtime fed any host block size, the state handed back every hop, against one model.py pass over
    the whole utterance: at most -60 dB of error."""
    torch = pytest.importorskip("torch")
    import model as M
    x = speechlike(2.0, seed=7) + 0.01 * np.random.default_rng(8).standard_normal(32000).astype(np.float32)
    with torch.no_grad():
        ref = M.enhance_stream(stream_net, torch.from_numpy(x)[None])[0][0].numpy()
    chain = P.make_chain(stream_config(stream_model), model_only=True)
    rng = np.random.default_rng(9)
    padded = np.concatenate([x, np.zeros(chain.latency_samples, np.float32)])
    sizes = rng.integers(1, 3000, 200) if block == "fuzz" else [block] * (len(padded) // block + 1)
    out, i = [], 0
    for n in sizes:
        if i >= len(padded):
            break
        out.append(chain.process(padded[i:i + n]))
        i += n
    got = np.concatenate(out)[chain.latency_samples:][:len(ref)]
    assert len(got) == len(ref)
    assert error_db(got, ref) <= -60
    assert np.std(got - x[:len(ref)]) > 1e-3, "the random model must change the audio, or the test proves nothing"


def test_stream_chain_state_ignores_digital_silence(stream_model):
    """Silence before the first sound (the live warm-up, a muted mic) leaves the state as a fresh chain's, so what
    follows is what a fresh chain makes of it; without that the running mean sinks to log(eps) meanwhile."""
    x = speechlike(1.5, seed=3) + 0.01 * np.random.default_rng(4).standard_normal(24000).astype(np.float32)
    fresh = P.make_chain(stream_config(stream_model))
    after_silence = P.make_chain(stream_config(stream_model))
    after_silence.process(np.zeros(256 * 100, np.float32))
    assert not after_silence.state.any()
    a, b = fresh.process(x), after_silence.process(x)
    assert np.abs(a).max() > 1e-3 and error_db(b, a) <= -60
    quiet = P.make_chain(stream_config(stream_model))  # a real microphone's floor (-90 dBFS) is not silence
    quiet.process(3e-5 * np.random.default_rng(5).standard_normal(256 * 20).astype(np.float32))
    assert quiet.state.any()


@pytest.mark.parametrize("mask", ["real", "complex"])
def test_stream_chain_with_unit_mask_passes_audio_through(mask):
    """A model that always answers 1 (made by export_model from a zeroed StreamNet with a large bias; for the
    complex mask a large real part and no imaginary one)."""
    torch = pytest.importorskip("torch")
    import export_model
    import model as M
    import tempfile
    from pathlib import Path
    net = M.StreamNet(hidden=16, mask=mask).eval()
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(30.0)
        net.out.bias[net.width:] = 0.0  # the imaginary parts (one per model output: bins, or bins and bands)
    path = Path(tempfile.mkdtemp()) / "ones_stream.onnx"
    export_model.export(net, path, export_model.base_metadata(net))
    x = speechlike(1.0, dbfs=-20)
    y = P.denoise_array(x, str(path), model_only=True, low_latency=True)
    assert error_db(y[:-512], x[:-512]) < -60


def test_low_latency_brings_its_own_live_cushion_and_block_unless_given():
    plain, fast = P.parse_args([]), P.parse_args(["--low-latency"])
    import live_audio
    assert (plain.out_target_ms, plain.block_ms) == (live_audio.OUT_TARGET_MS, live_audio.BLOCK_MS)
    assert (fast.out_target_ms, fast.block_ms) == (P.LOW_LATENCY_OUT_TARGET_MS, P.LOW_LATENCY_BLOCK_MS)
    given = P.parse_args(["--low-latency", "--out-target-ms", "35", "--block-ms=8"])
    assert (given.out_target_ms, given.block_ms) == (35, 8)
    assert P.parse_args(["--out-target-ms", "60"]).out_target_ms == 60


def test_low_latency_without_its_model_is_one_clear_line(tmp_path):
    sf.write(tmp_path / "a.wav", speechlike(0.5), 16000)
    done = run_script("ml_denoiser_pipeline.py", "--low-latency", "--model-low-latency",
                      str(tmp_path / "none.onnx"), "--input", str(tmp_path / "a.wav"), "--output",
                      str(tmp_path / "b.wav"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: model not found") and len(done.stderr.strip().splitlines()) == 1


def test_bench_low_latency_prints_rtf_and_latency(stream_model):
    done = run_script("ml_denoiser_pipeline.py", "--bench", "--low-latency", "--model-low-latency",
                      str(stream_model))
    assert done.returncode == 0, done.stderr
    assert "real-time factor:" in done.stdout and "algorithmic latency: 32 ms (512 samples)" in done.stdout
