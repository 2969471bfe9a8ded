"""train.py: the loss terms, a short run that learns, exact resume, fine-tuning, both dev sets, DDP on CPU."""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dataset
import model as M
import train
from conftest import REPO

TINY = ["--base-ch", "8", "--batch-size", "8", "--val-examples", "32", "--dev-files", "2", "--lr", "3e-3",
        "--num-threads", "1"]


def tiny_args(corpus, out, *extra):
    return ["--speech", str(corpus / "speech"), "--noise", str(corpus / "noise"), "--dev", str(corpus / "dev"),
            "--out-dir", str(out), *TINY, *extra]


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_si_snr_is_scale_invariant_and_perfect_for_the_reference():
    ref = torch.randn(4, 3200)
    noise = torch.randn(4, 3200)
    est = ref + 0.1 * noise
    assert torch.allclose(train.si_snr(est, ref), train.si_snr(7.3 * est, ref), atol=1e-3)
    assert (train.si_snr(ref, ref) > 60).all()
    assert train.si_snr(ref + noise, ref).mean() < train.si_snr(est, ref).mean()
    assert torch.isclose(train.si_snr_loss(est, ref), -train.si_snr(est, ref).mean())


def test_envelope_loss_follows_intelligibility():
    """1 - STOI's band-envelope correlation: 0 for the clean signal at any level, larger with more noise on the
    speech, blind to noise in frames the clean signal leaves silent (as STOI drops them), finite gradients."""
    torch.manual_seed(0)
    t = torch.arange(3200) / 16000
    ref = torch.randn(4, 3200) * (1.1 + torch.sin(2 * torch.pi * 4 * t)) ** 2  # noise at a syllable rate
    noise = torch.randn(4, 3200)
    assert train.envelope_loss(3 * ref, ref).abs().max() < 1e-3
    some, more = train.envelope_loss(ref + noise, ref), train.envelope_loss(ref + 4 * noise, ref)
    assert (some > 0.02).all() and (more > some + 0.2).all()
    # A first half 50 dB down: frames whose 512-sample window stays before sample 1600 drop out. (Noise on
    # digital silence would be clipped away anyway; this tests the frame rule itself.)
    ref[:, :1600] *= 10 ** (-50 / 20)
    early, late = noise.clone(), noise.clone()
    early[:, 1000:], late[:, :2200] = 0, 0
    assert train.envelope_loss(ref + early, ref).abs().max() < 1e-4
    assert (train.envelope_loss(ref + late, ref) > 0.01).all()
    est = (ref + noise).requires_grad_(True)
    train.envelope_loss(est, ref).mean().backward()
    assert torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0


def test_compressed_mag_loss_is_level_free_and_defined_on_pauses():
    ref, noise = torch.randn(4, 3200), torch.randn(4, 3200)
    noisy = ref + noise
    assert train.compressed_mag_loss(ref, ref, noisy).max() < 1e-6
    near, far = (train.compressed_mag_loss(ref + a * noise, ref, noisy) for a in (0.1, 0.5))
    assert (far > near).all() and (near > 0).all()
    assert torch.allclose(train.compressed_mag_loss(3 * (ref + 0.1 * noise), 3 * ref, 3 * noisy), near, rtol=1e-4)
    ref[1] = 0  # a pause: what comes out is what is scored, and silence out scores ~0 with a finite gradient
    est = torch.zeros(4, 3200, requires_grad=True)
    loss = train.compressed_mag_loss(est, ref, noisy)
    loss.sum().backward()
    assert loss[1] < 1e-3 and torch.isfinite(est.grad).all()
    assert train.compressed_mag_loss(0.1 * noise, ref, noisy)[1] > 10 * loss[1]


def test_mag_weight_adds_the_magnitude_term_to_the_loss(tiny_corpus, tmp_path, monkeypatch):
    """Same data, same start: one step's loss with the term is the SI-SNR loss plus a positive amount, the
    choice is recorded for the export, and the dev log carries STOI."""
    monkeypatch.chdir(tmp_path)
    one = ["--epochs", "1", "--steps-per-epoch", "2", "--max-steps", "1"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "plain", *one)) == 0
    assert train.main(tiny_args(tiny_corpus, tmp_path / "mag", *one, "--mag-weight", "25")) == 0
    plain, mag = (read_log(tmp_path / d / "train_log.csv")[-1] for d in ("plain", "mag"))
    assert float(mag["train_loss"]) > float(plain["train_loss"]) + 0.01
    assert 0.0 < float(plain["dev_stoi"]) < 1.0
    ck = torch.load(tmp_path / "mag" / "last.pt", weights_only=False)
    assert ck["config"]["mag_weight"] == 25 and ck["config"]["mag_power"] == train.MAG_POWER
    for flag in ("--mag-weight", "--stoi-weight"):
        with pytest.raises(SystemExit, match="must be in 0..1000|must be in 0..10000"):
            train.main(tiny_args(tiny_corpus, tmp_path / "bad", flag, "-1"))


# The call-like mixing off: a training loss over 10 steps of random babble, clipping and levels is too noisy
# to compare one epoch with the next.
PLAIN_FLAGS = ["--snr-focus-share", "0", "--clip-prob", "0", "--two-noise-prob", "0", "--babble-prob", "0",
               "--typing-prob", "0", "--level-swing-prob", "0", "--mic-colour-prob", "0"]


def test_twenty_steps_lower_the_loss(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the decoded-corpus cache goes here
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ck", "--epochs", "2", "--steps-per-epoch", "10",
                                *PLAIN_FLAGS)) == 0
    rows = read_log(tmp_path / "ck" / "train_log.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert float(rows[-1]["val_si_snr"]) > float(rows[0]["val_si_snr"]) + 1.0
    assert float(rows[2]["train_loss"]) < float(rows[1]["train_loss"])
    assert "dev_pesq_wb" in rows[-1]
    assert (tmp_path / "ck" / "best.pt").exists()


def test_resume_continues_exactly(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--epochs", "2", "--dev-files", "0"]
    recipe = ["--steps-per-epoch", "4", "--snr-range-db", "-10", "20", "--babble-prob", "0.5",
              "--mic-colour-prob", "0.5", "--seed", "7"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "straight", *common, *recipe)) == 0
    assert train.main(tiny_args(tiny_corpus, tmp_path / "split", *common, *recipe, "--max-steps", "4")) == 0  # "killed"
    # The recipe is not repeated: --resume takes it from last.pt (with the defaults it would mix other data), and
    # the length too: without --epochs it finishes the 2-epoch cosine it started on, not one of EPOCHS.
    assert train.main(tiny_args(tiny_corpus, tmp_path / "split", "--dev-files", "0", "--resume")) == 0
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert b["epoch"] == 2 and b["step"] == 8
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    assert b["config"] == a["config"]
    with pytest.raises(SystemExit, match=r"snr_range_db -10 20, not -5 20: --resume continues"):
        train.main(tiny_args(tiny_corpus, tmp_path / "split", *common, "--resume", "--snr-range-db", "-5", "20"))
    with pytest.raises(SystemExit, match="seed 7, not 1234"):
        train.main(tiny_args(tiny_corpus, tmp_path / "split", *common, "--resume", "--seed", "1234"))


def test_resume_with_more_epochs_restarts_the_longer_cosine(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--steps-per-epoch", "4", "--dev-files", "0", "--lr", "1e-3", "--lr-min", "1e-5"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ck", *common, "--epochs", "2")) == 0
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ck", "--resume", "--epochs", "4")) == 0
    with open(tmp_path / "ck" / "train_log.csv") as f:
        lr = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    # The first run ended on the floor; the resumed one follows the 16-step cosine from step 8, as a run started
    # with --epochs 4 would have, instead of staying on the floor.
    assert lr[8] == pytest.approx(1e-5)
    for step in (12, 16):
        assert lr[step] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 16)) / 2, rel=1e-6)
    assert lr[12] > 10 * lr[8]


def test_resume_without_checkpoint_is_a_clear_error(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(tiny_args(tiny_corpus, tmp_path / "none", "--resume"))


def test_fine_tune_starts_from_the_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    """--init-from starts from a checkpoint's weights with a fresh schedule, and the checkpoint records where it
    started; a resume continues that run and refuses a flag that contradicts its recipe."""
    monkeypatch.chdir(tmp_path)
    assert train.main(tiny_args(tiny_corpus, tmp_path / "base", "--epochs", "1", "--steps-per-epoch", "3")) == 0
    base = torch.load(tmp_path / "base" / "last.pt", weights_only=False)
    ft = ["--init-from", str(tmp_path / "base" / "last.pt"), "--epochs", "1", "--steps-per-epoch", "3",
          "--mag-weight", "2"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ft", *ft)) == 0
    rows = read_log(tmp_path / "ft" / "train_log.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert ck["config"]["init_from"].endswith("last.pt")
    assert ck["step"] == 3  # a new run: the step count restarts
    # Conv weights: 3 Adam steps at lr 3e-3 move each by at most ~0.01; a fresh init would differ by ~0.1.
    moved = max((ck["model"][k] - base["model"][k]).abs().max().item()
                for k in base["model"] if base["model"][k].ndim == 4)
    assert 0 < moved < 0.03
    with pytest.raises(SystemExit, match="mag_weight 2.0, not 0.0"):
        train.main(tiny_args(tiny_corpus, tmp_path / "ft", "--resume", "--epochs", "2", "--mag-weight", "0"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(tiny_args(tiny_corpus, tmp_path / "x", "--init-from", str(tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match="pick one"):
        train.main(tiny_args(tiny_corpus, tmp_path / "ft", *ft, "--resume"))


def test_fine_tune_from_the_average_of_two_checkpoints(tiny_corpus, tmp_path, monkeypatch):
    """--init-from A B starts from the mean of their weights (epoch 0 validates exactly that model)."""
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", "1"), ("b", "2")):
        assert train.main(tiny_args(tiny_corpus, tmp_path / name, "--epochs", "1", "--steps-per-epoch", "2",
                                    "--seed", seed)) == 0
    a, b = tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt"
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ab", "--init-from", str(a), str(b), "--epochs", "1",
                                "--steps-per-epoch", "1", "--lr", "0", "--lr-min", "0")) == 0
    ck = torch.load(tmp_path / "ab" / "last.pt", weights_only=False)
    assert ck["config"]["init_from"] == f"{a} {b}"
    mean = M.average_checkpoints([a, b])["model"]
    # lr 0: the weights stay the average (BatchNorm's running statistics still move in the one train step)
    assert all(torch.allclose(ck["model"][k], v) for k, v in mean.items() if k.endswith("weight"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(tiny_args(tiny_corpus, tmp_path / "x", "--init-from", str(a), str(tmp_path / "none.pt")))


def test_mixing_flags_reach_the_mixer_and_the_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    """The mixing options reach the mixer and the checkpoint records them for the export's metadata; bad ones
    fail before the corpus is decoded."""
    monkeypatch.chdir(tmp_path)
    extra = ["--snr-span", "utterance", "--epochs", "1", "--steps-per-epoch", "4", "--babble-prob", "0.5",
             "--clip-prob", "0.2", "--snr-range-db", "-10", "20", "--speech-level-dbfs", "-40", "-20",
             "--babble-talkers", "2", "3", "--stoi-weight", "5", "--keys", "", "--noise-exclude", "nothing*"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "p", *extra)) == 0
    ck = torch.load(tmp_path / "p" / "last.pt", weights_only=False)
    cfg = ck["config"]
    assert cfg["snr_span"] == "utterance" and cfg["babble_prob"] == 0.5 and cfg["clip_prob"] == 0.2
    assert cfg["babble_talkers"] == [2, 3] and cfg["snr_range_db"] == [-10, 20]
    assert cfg["speech_level_dbfs"] == [-40, -20] and cfg["stoi_weight"] == 5 and cfg["noise_exclude"] == "nothing*"
    assert cfg["typing_prob"] == dataset.TYPING_PROB  # asked for, recorded as asked ...
    assert "SNR -10..20 dB over the utterance" in cfg["data"] and "0 keys for typing" in cfg["data"]
    assert "typing 0," in cfg["data"]  # ... but with no keys there was none, and the summary says so
    rows = read_log(tmp_path / "p" / "train_log.csv")
    assert all(torch.isfinite(torch.tensor(float(r[k]))) for r in rows[1:] for k in ("train_loss", "val_si_snr"))
    # Validation is not mixed like a call: a run with other mixing validates on the same windows as a plain one.
    speech, noise = dataset.load_corpus(tiny_corpus / "speech"), dataset.load_corpus(tiny_corpus / "noise")
    called = dataset.Mixer(speech, noise, 1600, babble_prob=0.9, mic_colour_prob=1.0, snr_range_db=(-10, -10))
    assert np.array_equal(train.validation_set(called, 8, seed=0)[0],
                          train.validation_set(dataset.Mixer(speech, noise, 1600), 8, seed=0)[0])
    assert called.babble_prob == 0.9 and called.mic_colour_prob == 1.0
    for flags, message in ((["--snr-range-db", "20", "-10"], "LOW <= HIGH"),
                           (["--babble-prob", "2"], "must be in 0..1, not 2"),
                           (["--babble-prob", "0.6", "--typing-prob", "0.6"], "at most 1"),
                           (["--speech-level-dbfs", "-20", "5"], "must be in -80..0, not 5"),
                           (["--babble-talkers", "0", "3"], "must be in 1..32, not 0"),
                           (["--snr-span", "file"], "SNR span")):
        with pytest.raises(SystemExit, match=message):
            train.main(["--speech", str(tmp_path / "nowhere"), "--noise", str(tmp_path / "nowhere"), *flags])


def test_real_dev_set_is_validated_and_selects_with_dev(tiny_corpus, tmp_path, monkeypatch):
    """--dev-real is scored beside --dev; best.pt is chosen on the mean of the two, and each epoch is kept."""
    monkeypatch.chdir(tmp_path)
    args = tiny_args(tiny_corpus, tmp_path / "r", "--dev-real", str(tiny_corpus / "dev"), "--epochs", "2",
                     "--steps-per-epoch", "2")
    assert train.main(args) == 0
    rows = read_log(tmp_path / "r" / "train_log.csv")
    for r in rows:
        want = np.mean([float(r[f"{s}_pesq_wb"]) + train.SELECT_SNR_WEIGHT * float(r[f"{s}_si_snri"])
                        for s in ("dev", "dev_real")])
        assert abs(float(r["select"]) - want) < 1e-4
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert best["metrics"]["select"] == max(float(r["select"]) for r in rows[1:])
    assert sorted(p.name for p in (tmp_path / "r").glob("epoch*.pt")) == ["epoch1.pt", "epoch2.pt"]


@pytest.mark.parametrize("arch", ["unet", "stream-phase"])
def test_torchrun_two_processes_on_cpu(tiny_corpus, tmp_path, arch):
    """Two DistributedDataParallel processes; the streaming model's phase input reaches it through the wrapper."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = [*STREAM, "--stream-mask", "complex", "--stream-phase"] if arch == "stream-phase" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(REPO / "train.py"), *tiny_args(tiny_corpus, tmp_path / "ddp", *flags, "--epochs", "1",
                                              "--steps-per-epoch", "3", "--dev-files", "0")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_log(tmp_path / "ddp" / "train_log.csv")
    assert rows[-1]["epoch"] == "1" and rows[-1]["step"] == "3"


def test_fine_tune_with_noise_floor(tiny_corpus, tmp_path, monkeypatch):
    """--floor-hops widens a plain checkpoint's input with a zero-weighted noise-floor channel (so the run
    starts where the checkpoint was: the same dev score before the first step) and records K for the export."""
    monkeypatch.chdir(tmp_path)
    assert train.main(tiny_args(tiny_corpus, tmp_path / "base", "--epochs", "1", "--steps-per-epoch", "3")) == 0
    base_rows = read_log(tmp_path / "base" / "train_log.csv")
    ft = ["--init-from", str(tmp_path / "base" / "last.pt"), "--floor-hops", "4", "--floor-start-prob", "0.5",
          "--epochs", "1", "--steps-per-epoch", "3"]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ft", *ft)) == 0
    rows = read_log(tmp_path / "ft" / "train_log.csv")
    assert abs(float(rows[0]["dev_si_snri"]) - float(base_rows[-1]["dev_si_snri"])) < 1e-4
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert ck["config"]["floor_hops"] == 4 and ck["model"]["e1.0.weight"].shape[1] == 2
    assert ck["model"]["e1.0.weight"][:, 1].abs().max() > 0  # the floor's weights learned something
    assert train.main(tiny_args(tiny_corpus, tmp_path / "ft", "--resume", "--epochs", "2")) == 0
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["config"]["init_from"].endswith("base/last.pt")  # the lineage survives a resume
    assert ck["config"]["floor_hops"] == 4 and ck["step"] == 6  # taken from last.pt, not the flags' defaults
    with pytest.raises(SystemExit, match="floor_hops 4, not 0"):
        train.main(tiny_args(tiny_corpus, tmp_path / "ft", "--resume", "--epochs", "2", "--floor-hops", "0"))
    with pytest.raises(SystemExit, match="pass --floor-hops 4"):
        train.main(tiny_args(tiny_corpus, tmp_path / "x", "--init-from", str(tmp_path / "ft" / "last.pt")))


STREAM = ["--arch", "stream", "--stream-hidden", "32", "--stream-segment-samp", "8000"]


def test_stream_model_learns_and_resumes_as_started(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "st"
    assert train.main(tiny_args(tiny_corpus, out, *STREAM, "--stream-bands", "0", "--epochs", "2",
                                "--steps-per-epoch", "10", *PLAIN_FLAGS)) == 0  # every bin, as models before bands
    rows = read_log(out / "train_log.csv")
    assert float(rows[-1]["val_si_snr"]) > float(rows[0]["val_si_snr"]) + 0.5
    ck = torch.load(out / "best.pt", weights_only=False)
    assert ck["config"]["arch"] == "stream" and ck["config"]["n_fft"] == M.STREAM_N_FFT
    assert ck["config"]["stft_hop_samp"] == M.STREAM_HOP_SAMP and ck["config"]["hidden"] == 32
    with pytest.raises(SystemExit, match="hidden 32, not 64"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "3", "--stream-hidden", "64"))
    last = torch.load(out / "last.pt", weights_only=False)  # as made before --stream-mask: real, every bin
    del last["config"]["mask"], last["config"]["bands"]
    torch.save(last, out / "last.pt")
    assert train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "3", "--steps-per-epoch", "10")) == 0
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["epoch"] == 3 and last["config"]["mask"] == "real" and last["config"]["bands"] == 0
    with pytest.raises(SystemExit, match="is a stream model, not unet"):
        train.main(tiny_args(tiny_corpus, tmp_path / "u", "--init-from", str(out / "best.pt")))
    with pytest.raises(SystemExit, match="--stream-mask real"):
        train.main(tiny_args(tiny_corpus, tmp_path / "c", *STREAM, "--stream-mask", "complex",
                             "--init-from", str(out / "best.pt")))


def test_complex_mask_on_bands_stream_model_trains_resumes_and_exports(tiny_corpus, tmp_path, monkeypatch):
    """--stream-mask complex --stream-bands 16: recorded in the recipe, kept on --resume, exported with metadata
    mask=complex and bands=16 and run by the pipeline (the state holds 65 + 16 running means)."""
    import export_model
    import ml_denoiser_pipeline as P
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cx"
    flags = [*STREAM, "--stream-mask", "complex", "--stream-bands", "16", "--steps-per-epoch", "4", *PLAIN_FLAGS]
    assert train.main(tiny_args(tiny_corpus, out, *flags, "--epochs", "1")) == 0
    config = torch.load(out / "last.pt", weights_only=False)["config"]
    assert config["mask"] == "complex" and config["bands"] == 16
    with pytest.raises(SystemExit, match="mask complex, not real"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--stream-mask", "real"))
    with pytest.raises(SystemExit, match="bands 16, not 0"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--stream-bands", "0"))
    assert train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--steps-per-epoch", "4")) == 0
    onnx_path = tmp_path / "cx.onnx"
    assert export_model.main(["--checkpoint", str(out / "best.pt"), "--output", str(onnx_path), "--dev", ""]) == 0
    chain = P.make_chain(P.default_config(model=str(onnx_path)))
    assert isinstance(chain, P.StreamChain) and chain.complex_mask
    import onnxruntime as ort
    meta = ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map
    assert meta["bands"] == "16" and meta["state_size"] == str(M.STREAM_LINEAR_BINS + 16 + 2 * 32)
    y = chain.process(0.1 * np.random.default_rng(0).standard_normal(4096).astype(np.float32))
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    with pytest.raises(SystemExit, match="--stream-mask is real or complex"):
        train.main(tiny_args(tiny_corpus, tmp_path / "bad", *STREAM, "--stream-mask", "polar"))
    with pytest.raises(SystemExit, match="--stream-bands"):
        train.main(tiny_args(tiny_corpus, tmp_path / "bad", *STREAM, "--stream-bands", "500"))


def test_convolution_head_stream_model_trains_resumes_and_exports(tiny_corpus, tmp_path, monkeypatch):
    """--stream-head 4: recorded in the recipe, kept on --resume, exported with metadata head=4 and run by the
    pipeline with the same state as a model without it; refused with a complex mask."""
    import export_model
    import ml_denoiser_pipeline as P
    import onnxruntime as ort
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "hd"
    flags = [*STREAM, "--stream-head", "4", "--stream-bands", "16", "--steps-per-epoch", "4", *PLAIN_FLAGS]
    assert train.main(tiny_args(tiny_corpus, out, *flags, "--epochs", "1")) == 0
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["config"]["head"] == 4 and ck["model"]["refine.0.weight"].shape[0] == 4
    with pytest.raises(SystemExit, match="head 4, not 0"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--stream-head", "0"))
    assert train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--steps-per-epoch", "4")) == 0
    onnx_path = tmp_path / "hd.onnx"
    assert export_model.main(["--checkpoint", str(out / "best.pt"), "--output", str(onnx_path), "--dev", ""]) == 0
    meta = ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map
    assert meta["head"] == "4" and meta["state_size"] == str(M.STREAM_LINEAR_BINS + 16 + 2 * 32)
    chain = P.make_chain(P.default_config(model=str(onnx_path)))
    assert isinstance(chain, P.StreamChain)
    y = chain.process(0.1 * np.random.default_rng(0).standard_normal(4096).astype(np.float32))
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    with pytest.raises(SystemExit, match="--stream-head refines a real mask"):
        train.main(tiny_args(tiny_corpus, tmp_path / "bad", *STREAM, "--stream-head", "4", "--stream-mask", "complex"))


def test_band_gru_starts_from_a_head_model_resumes_and_exports(tiny_corpus, tmp_path, monkeypatch):
    """--stream-band-gru 4 from a head model's weights (--init-from: the new layers start at zero, so the first
    validation scores the head model's mask), kept on --resume, exported with metadata band_gru=4 and each band's
    GRU state in the state, run by the pipeline and equal frame by frame to PyTorch; refused without a head,
    and a head model refused as the start of a model without one."""
    import export_model
    import ml_denoiser_pipeline as P
    import onnxruntime as ort
    monkeypatch.chdir(tmp_path)
    base = [*STREAM, "--stream-head", "4", "--stream-bands", "16", "--steps-per-epoch", "4", *PLAIN_FLAGS]
    assert train.main(tiny_args(tiny_corpus, tmp_path / "hd", *base, "--epochs", "1")) == 0
    out = tmp_path / "bg"
    flags = [*base, "--stream-band-gru", "4", "--init-from", str(tmp_path / "hd" / "last.pt")]
    assert train.main(tiny_args(tiny_corpus, out, *flags, "--epochs", "1")) == 0
    import csv
    rows = lambda run: list(csv.DictReader(open(tmp_path / run / "train_log.csv")))
    start, head_end = rows("bg")[0], rows("hd")[-1]  # the same fixed validation windows and dev pairs
    assert start["epoch"] == "0" and (start["val_si_snr"], start["select"]) == (head_end["val_si_snr"],
                                                                               head_end["select"])
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["config"]["band_gru"] == 4 and ck["model"]["along.weight_hh_l0"].shape == (12, 4)
    with pytest.raises(SystemExit, match="band_gru 4, not 0"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--stream-band-gru", "0"))
    assert train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--steps-per-epoch", "4")) == 0
    onnx_path = tmp_path / "bg.onnx"
    assert export_model.main(["--checkpoint", str(out / "last.pt"), "--output", str(onnx_path), "--dev", ""]) == 0
    sess = ort.InferenceSession(str(onnx_path))
    meta = sess.get_modelmeta().custom_metadata_map
    width = M.STREAM_LINEAR_BINS + 16
    assert meta["band_gru"] == "4" and meta["state_size"] == str(width + 2 * 32 + width * 4)
    net, _ = export_model.load_checkpoint(out / "last.pt")
    assert export_model.stream_parity(net, sess, "") < 1e-5  # the mask in [0, 1], frame by frame from zero state
    chain = P.make_chain(P.default_config(model=str(onnx_path)))
    y = chain.process(0.1 * np.random.default_rng(0).standard_normal(4096).astype(np.float32))
    assert isinstance(chain, P.StreamChain) and np.isfinite(y).all() and np.abs(y).max() > 0
    with pytest.raises(SystemExit, match="--stream-band-gru sits inside the convolution head"):
        train.main(tiny_args(tiny_corpus, tmp_path / "bad", *STREAM, "--stream-band-gru", "4"))
    with pytest.raises(SystemExit, match="another width"):
        train.main(tiny_args(tiny_corpus, tmp_path / "bad", *STREAM, "--stream-bands", "16", "--epochs", "1",
                             "--init-from", str(out / "last.pt")))


def test_phase_input_stream_model_trains_resumes_and_is_not_exported(tiny_corpus, tmp_path, monkeypatch):
    """--stream-phase: the low bins' noisy phase as extra inputs, recorded in the recipe and kept on --resume
    (an older checkpoint without the key resumes without it); the export refuses it in one line, since the
    pipeline does not feed the phase."""
    import export_model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ph"
    flags = [*STREAM, "--stream-mask", "complex", "--stream-phase", "--steps-per-epoch", "4", *PLAIN_FLAGS]
    assert train.main(tiny_args(tiny_corpus, out, *flags, "--epochs", "1")) == 0
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["config"]["phase"] is True and ck["model"]["inp.weight"].shape[1] > 2 * (M.STREAM_LINEAR_BINS + 48)
    with pytest.raises(SystemExit, match="phase True, not False"):
        train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--no-stream-phase"))
    assert train.main(tiny_args(tiny_corpus, out, "--resume", "--epochs", "2", "--steps-per-epoch", "4")) == 0
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    with pytest.raises(SystemExit, match="takes the noisy phase"):
        export_model.main(["--checkpoint", str(out / "best.pt"), "--output", str(tmp_path / "ph.onnx"), "--dev", ""])
    assert not (tmp_path / "ph.onnx").exists()


def test_stream_refuses_the_unet_noise_floor(tiny_corpus, tmp_path):
    with pytest.raises(SystemExit, match="drop --floor-hops"):
        train.main(tiny_args(tiny_corpus, tmp_path / "x", *STREAM, "--floor-hops", "20"))
