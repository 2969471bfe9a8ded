"""Tests of evaluate.py and the modules it scores with (peers.py, metrics.py) on real dev pairs from
../shared/data/dev, real peers and real metrics."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "dev"
sys.path.insert(0, str(REPO))

import evaluate as ev  # noqa: E402
import metrics  # noqa: E402
import peers  # noqa: E402

# A 6 s pair where every neural peer clearly helps (noisy PESQ-WB 1.36).
PAIR = "004_ls2033_03_exercise_bike_snr15"
# A 0 dB pair: the clean file must score far better on DNSMOS than its noisy twin.
LOW_SNR_PAIR = "002_ls1688_04_wind_snr0"

pytestmark = pytest.mark.skipif(not (DEV / "clean").is_dir(),
                                reason="shared dev data not found at ../shared/data/dev")


def load(name):
    clean = sf.read(str(DEV / "clean" / f"{name}.wav"), dtype="float32")[0]
    noisy = sf.read(str(DEV / "noisy" / f"{name}.wav"), dtype="float32")[0]
    return clean, noisy


def write_pair(root, name, seconds=None, start_s=0.0):
    """Copy (a slice of) a real dev pair into root/clean and root/noisy."""
    clean, noisy = load(name)
    a = int(start_s * metrics.SAMPLE_RATE)
    b = None if seconds is None else a + int(seconds * metrics.SAMPLE_RATE)
    for kind, x in (("clean", clean), ("noisy", noisy)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        sf.write(str(root / kind / f"{name}.wav"), x[a:b], metrics.SAMPLE_RATE, subtype="PCM_16")


def test_metrics_on_identical_signals():
    clean, _ = load(PAIR)
    assert metrics.si_snr(clean, clean) > 80
    pesq, note = metrics.pesq_wb(clean, clean)
    assert note is None and pesq > 4.5
    stoi, note = metrics.stoi_score(clean, clean)
    assert note is None and stoi > 0.99


def test_alignment_finds_delay_and_advance():
    clean, _ = load(PAIR)
    late = np.concatenate([np.zeros(37, np.float32), clean])
    aligned, lag = metrics.align(late, clean)
    assert lag == 37
    assert metrics.si_snr(aligned, clean) > 60
    early = clean[25:]
    aligned, lag = metrics.align(early, clean)
    assert lag == -25
    assert metrics.si_snr(aligned[25:], clean[25:]) > 60
    # A shifted copy scores like the original once aligned.
    assert metrics.pesq_wb(clean, metrics.align(late, clean)[0])[0] > 4.5


def test_dnsmos_prefers_clean_over_noisy():
    clean, noisy = load(LOW_SNR_PAIR)
    dnsmos = metrics.Dnsmos()
    sig_c, bak_c, ovrl_c = dnsmos(clean)
    sig_n, bak_n, ovrl_n = dnsmos(noisy)
    assert ovrl_c > ovrl_n + 0.5
    assert bak_c > bak_n + 0.5
    assert all(1.0 <= v <= 5.0 for v in (sig_c, bak_c, ovrl_c, sig_n, bak_n, ovrl_n))


def test_dnsmos_hears_level_unless_told_one():
    """As produced, a quieter copy reads as different (DNSMOS is level-sensitive); with a common level
    every scaling of a file scores the same."""
    _, noisy = load(LOW_SNR_PAIR)
    plain, levelled = metrics.Dnsmos(), metrics.Dnsmos(level_dbfs=-26)
    assert abs(plain(noisy)[1] - plain(0.2 * noisy)[1]) > 0.05
    assert np.allclose(levelled(noisy), levelled(0.2 * noisy), atol=2e-3)
    assert ev.main(["--noisy", str(DEV / "noisy"), "--dnsmos-level", "5"]) == 1


@pytest.mark.parametrize("name, lag_ms", [("rnnoise", 20.0), ("nsnet2", 0.0), ("dtln", 24.0), ("gtcrn", 0.0),
                                          ("deepfilternet", 30.0), ("speex", 10.0)])
def test_real_peer_improves_pesq(name, lag_ms):
    clean, noisy = load(PAIR)
    try:
        method = ev.BUILTIN_METHODS[name](None)
    except peers.Unavailable as exc:
        pytest.fail(f"{exc}: pip install -r requirements-eval.txt && "
                    "pip install --no-deps -r requirements-eval-nodeps.txt")
    out = method.process(noisy.copy())
    aligned, lag = metrics.align(out, clean)
    assert lag * 1000 / metrics.SAMPLE_RATE == pytest.approx(lag_ms, abs=1.0)
    assert metrics.pesq_wb(clean, aligned)[0] > metrics.pesq_wb(clean, noisy)[0] + 0.2


@pytest.mark.parametrize("name", ["dsp", "ml", "ml-model"])
def test_our_pipelines_run_aligned_through_file_mode(name):
    """denoise_array promises an aligned, same-length output; evaluate.py relies on it."""
    if name != "dsp" and not (REPO / "denoiser.onnx").is_file():
        pytest.skip("denoiser.onnx not exported yet")
    clean, noisy = load(PAIR)
    method = ev.BUILTIN_METHODS[name](ev.build_parser().parse_args(["--noisy", "unused"]))
    assert method.latency_ms > 0
    out = method.process(noisy.copy())
    assert len(out) == len(noisy)
    assert abs(metrics.align(out, clean)[1]) <= metrics.SAMPLE_RATE // 2000  # within 0.5 ms


def test_identity_command_scores_exactly_as_noisy_and_writes_everything(tmp_path, capsys):
    # 5 s: DNSMOS tiles it to 10 s, one 9.01 s window, which keeps the test quick.
    write_pair(tmp_path, PAIR, seconds=5.0, start_s=0.5)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- eval:begin -->\nold numbers\n<!-- eval:end -->\nafter\n")
    out = tmp_path / "out"
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"),
                  "--methods", "noisy,copy", "--cmd", "copy", "cp {in} {out}", "--out", str(out),
                  "--by-snr", "--readme", str(readme), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with open(out / "scores.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"noisy input", "copy"}
    for key in ("pesq", "stoi", "si_snr", "si_snri", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert rows["copy"][key] == rows["noisy input"][key], key
    assert float(rows["copy"]["si_snri"]) == 0.0
    assert float(rows["copy"]["lag_ms"]) == 0.0
    assert float(rows["copy"]["snr_db"]) == 15.0
    assert float(rows["copy"]["rtf"]) > 0
    results = (out / "results.md").read_text()
    assert "| copy |" in results and "By input SNR" in results and "15 dB" in results
    for png in ("bar_pesq.png", "bar_dnsmos_ovrl.png", "bar_rtf.png", f"spectrogram_{PAIR}.png",
                "snr_pesq.png"):
        assert (out / png).stat().st_size > 1000, png
    text = readme.read_text()
    assert "old numbers" not in text
    assert text.startswith("# Title\n\nbefore\n<!-- eval:begin -->\n")
    assert text.endswith("<!-- eval:end -->\nafter\n")
    assert "| noisy input |" in text and "| copy |" in text


def test_missing_peer_is_skipped_with_a_note(tmp_path):
    clean, noisy = load(PAIR)
    pair = ev.Pair("p", noisy[:16000], clean[:16000], None)

    def setup_ghost():
        peers.package_file("surely_no_such_denoiser", "model.onnx", "ghost-denoiser")
        return peers.Method("ghost", "Ghost", lambda x: x, 10.0)

    rows, methods, notes, _ = ev.evaluate(
        [pair], [("noisy", lambda: ev.setup_noisy(None)), ("ghost", setup_ghost)], progress=False,
        with_dnsmos=False)
    assert [m.name for m in methods] == ["noisy"]
    assert [r["method"] for r in rows] == ["noisy input"]
    assert "ghost skipped: ghost-denoiser is not installed" in notes


def test_mismatched_file_lists_give_a_clear_error(tmp_path, capsys):
    clean, noisy = load(PAIR)
    for kind, names in (("clean", ["a", "b"]), ("noisy", ["a", "c"])):
        (tmp_path / kind).mkdir()
        for n in names:
            sf.write(str(tmp_path / kind / f"{n}.wav"), clean[:8000], metrics.SAMPLE_RATE)
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"),
                  "--out", str(tmp_path / "out"), "--no-dnsmos", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "same file names" in err and "c.wav" in err and "b.wav" in err


def test_unknown_method_and_missing_markers_are_errors(tmp_path, capsys):
    write_pair(tmp_path, PAIR, seconds=1.0)
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"),
                  "--methods", "noisy,magic", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown magic" in err and "nsnet2" in err
    rc = ev.main(["--noisy", str(tmp_path / "noisy"), "--cmd", "x", "tool-without-placeholders"])
    assert rc != 0 and "must contain {in} and {out}" in capsys.readouterr().err
    readme = tmp_path / "R.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ev.EvalError, match="markers"):
        ev.update_readme(readme, "table")
    assert readme.read_text() == "no markers here\n"


def test_a_failing_command_is_stopped_with_a_note(tmp_path, capsys):
    write_pair(tmp_path, PAIR, seconds=1.0)
    out = tmp_path / "out"
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"),
                  "--methods", "broken", "--cmd", "broken", "false {in} {out}", "--out", str(out),
                  "--no-dnsmos", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert f"broken stopped on {PAIR}: --cmd broken: exit code 1" in (out / "results.md").read_text()


def test_too_short_clip_is_reported_not_crashed(tmp_path, capsys):
    write_pair(tmp_path, PAIR, seconds=0.2, start_s=2.0)
    out = tmp_path / "out"
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"),
                  "--methods", "noisy", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with open(out / "scores.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["pesq"] == "nan" and "PESQ not scored" in row["note"]
    assert row["stoi"] == "nan" and "STOI not scored" in row["note"]
    assert np.isfinite(float(row["dnsmos_ovrl"]))
    assert "PESQ not scored" in (out / "results.md").read_text()


def test_noisy_folder_alone_scores_reference_free_metrics(tmp_path, capsys):
    write_pair(tmp_path, LOW_SNR_PAIR, seconds=5.0)
    out = tmp_path / "out"
    rc = ev.main(["--noisy", str(tmp_path / "noisy"), "--methods", "noisy,speex", "--out", str(out),
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    results = (out / "results.md").read_text()
    assert "DNSMOS OVRL" in results and "PESQ" not in results
    with open(out / "scores.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["Speex"]["dnsmos_bak"]) > float(rows["noisy input"]["dnsmos_bak"])


def test_ml_variant_runs_the_pipeline_with_changed_constants(tmp_path, capsys):
    import ml_denoiser_pipeline as ml
    from conftest import tiny_onnx
    model = tiny_onnx(tmp_path / "ones.onnx", value=1.0)  # mask 1: the variant flags alone decide the output
    write_pair(tmp_path, PAIR, seconds=3.0)
    clean, noisy = load(PAIR)
    noisy = noisy[:3 * metrics.SAMPLE_RATE]
    args = ev.build_parser().parse_args(["--noisy", "unused", "--model", str(model)])
    flags = "--no-eq --no-gate --input-gain 1 --output-gain 1 --mask-power 1"
    method = ev.setup_ml_variant(args, "transparent", flags)
    assert method.latency_ms == ml.latency_ms()
    assert np.abs(method.process(noisy.copy()) - noisy).max() < 1e-3
    half = tiny_onnx(tmp_path / "half.onnx", value=0.5)  # a variant's own --model beats the global one
    method = ev.setup_ml_variant(args, "half", f"{flags} --model {half}")
    assert np.abs(method.process(noisy.copy()) - 0.5 * noisy).max() < 1e-3
    rc = ev.main(["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"), "--methods", "x",
                  "--ml-variant", "x=--no-such-flag", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc != 0 and "not ml_denoiser_pipeline.py flags" in capsys.readouterr().err


def test_sets_score_dev_and_dev_real_in_one_command(tmp_path, capsys):
    """--sets scores each paired set into its own table (README block, results.md, per-set CSV and charts);
    --sets and --noisy do not mix, and a set without clean/ and noisy/ is a one-line error."""
    write_pair(tmp_path / "a", PAIR, seconds=3.0)
    write_pair(tmp_path / "b", LOW_SNR_PAIR, seconds=3.0)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- eval:begin -->\n<!-- eval:end -->\n")
    out = tmp_path / "out"
    rc = ev.main(["--sets", f"first={tmp_path / 'a'}", f"second={tmp_path / 'b'}", "--methods", "noisy",
                  "--out", str(out), "--readme", str(readme), "--no-dnsmos", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    text = readme.read_text()
    assert "**first**: 1 pairs" in text and "**second**: 1 pairs" in text and text.count("| noisy input |") == 2
    report = (out / "results.md").read_text()
    assert "## first" in report and "## second" in report
    for name, pair in (("first", PAIR), ("second", LOW_SNR_PAIR)):
        with open(out / name / "scores.csv", newline="") as fh:
            assert [r["file"] for r in csv.DictReader(fh)] == [pair]
    assert ev.main(["--sets", "first=" + str(tmp_path), "--methods", "noisy", "--quiet"]) == 1
    assert "needs clean/ and noisy/" in capsys.readouterr().err
    assert ev.main(["--sets", "dev", "--noisy", str(tmp_path / "a" / "noisy"), "--quiet"]) == 1
    assert "one or the other" in capsys.readouterr().err
    assert ev.main(["--sets", "nosuchset", "--quiet"]) == 1
    assert "a known set" in capsys.readouterr().err


def test_compare_counts_a_difference_only_beyond_its_paired_interval(tmp_path, capsys):
    """--compare A,B: B - A file by file. Identical outputs differ by exactly nothing; a steady gain on every file
    is "better" even where the two means' own intervals overlap; a gain that comes and goes is no difference."""
    write_pair(tmp_path, PAIR, seconds=3.0)
    out = tmp_path / "out"
    args = ["--clean", str(tmp_path / "clean"), "--noisy", str(tmp_path / "noisy"), "--methods", "noisy,copy",
            "--cmd", "copy", "cp {in} {out}", "--out", str(out), "--no-dnsmos", "--quiet"]
    assert ev.main(args + ["--compare", "noisy, copy"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "copy - noisy input" in printed and "| PESQ-WB | +0.00 ± " in printed, printed
    assert "too few files" in printed  # one pair: no interval
    assert "Comparison" in (out / "results.md").read_text()
    for bad in ("noisy", "noisy,noisy", "noisy,dsp", "noisy,copy,x"):
        assert ev.main(args + ["--compare", bad]) == 1
        assert "--compare" in capsys.readouterr().err

    methods = [peers.Method("a", "A", None, None), peers.Method("b", "B", None, None)]
    base = np.linspace(1.5, 3.0, 10)
    steady = [{"file": str(i), "method": "A", "pesq": base[i]} for i in range(10)]
    steady += [{"file": str(i), "method": "B", "pesq": base[i] + 0.05} for i in range(10)]
    assert "| PESQ-WB | +0.05 ± 0.00 | B better |" in ev.paired_table(steady, methods, "a", "b")
    assert "| PESQ-WB | -0.05 ± 0.00 | A worse |" in ev.paired_table(steady, methods, "b", "a")
    assert metrics.mean_ci(base)[1] > 0.05  # the tables' own intervals would overlap
    mixed = steady[:10] + [{"file": str(i), "method": "B", "pesq": base[i] + (0.3 if i % 2 else -0.25)}
                           for i in range(10)]
    assert "no difference" in ev.paired_table(mixed, methods, "a", "b")
