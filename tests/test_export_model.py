"""export_model.py: ONNX parity with torch, free time axis, metadata the pipeline checks, INT8."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import export_model
import model as M
import train
from conftest import REPO


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")
    import os
    cwd = os.getcwd()
    os.chdir(out)
    try:
        train.main(["--speech", str(tiny_corpus / "speech"), "--noise", str(tiny_corpus / "noise"), "--dev", "",
                    "--out-dir", str(out), "--base-ch", "8", "--batch-size", "4", "--epochs", "1",
                    "--steps-per-epoch", "2", "--val-examples", "8", "--num-threads", "1"])
    finally:
        os.chdir(cwd)
    return out / "best.pt"


def assert_same_model(got, shipped):
    """The same graph, metadata and weights as the shipped file. Weights compare to float32 rounding, not bytes:
    the export folds batch norm into the convolutions in float32, and which SIMD path torch takes for that
    depends on the CPU, so another machine may land one unit in the last place away."""
    import onnx
    from onnx import numpy_helper
    a, b = onnx.load(str(got)), onnx.load(str(shipped))
    assert [p.key + p.value for p in a.metadata_props] == [p.key + p.value for p in b.metadata_props]
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    wa = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys()
    for name, w in wa.items():
        assert w.dtype == wb[name].dtype and w.shape == wb[name].shape, name
        # A few ulps of the tensor's largest weight; a retrained or different checkpoint differs by far more.
        np.testing.assert_allclose(w, wb[name], rtol=0, atol=4 * np.spacing(np.abs(wb[name]).max()), err_msg=name)


def test_export_parity_metadata_and_free_time_axis(checkpoint, tmp_path, dev_dir):
    out = tmp_path / "m.onnx"
    assert export_model.main(["--checkpoint", str(checkpoint), "--output", str(out), "--dev", str(dev_dir)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["sample_rate"] == "16000" and meta["n_fft"] == "512" and meta["stft_hop_samp"] == "128"
    assert meta["window_samp"] == "3200" and meta["base_ch"] == "8" and meta["context_samp"] == "0"
    assert "speech" in meta["training_data"] and "val_si_snr" in json.loads(meta["dev_metrics"])
    net, _ = export_model.load_checkpoint(checkpoint)
    for frames in (1, 26, 77):
        x = torch.randn(1, 1, 257, frames)
        with torch.no_grad():
            ref = net(x).numpy()
        assert np.abs(sess.run(None, {"logmag": x.numpy()})[0] - ref).max() < 1e-4


def test_metadata_names_the_checkpoint_a_fine_tune_started_from(checkpoint):
    net, ck = export_model.load_checkpoint(checkpoint)
    assert "init_from" not in export_model.base_metadata(net, ck)
    ck["config"]["init_from"] = "checkpoints/best.pt"
    assert export_model.base_metadata(net, ck)["init_from"] == "checkpoints/best.pt"
    assert "loss" not in export_model.base_metadata(net, ck)  # the spec's SI-SNR loss adds no entry
    ck["config"]["loss"] = "snr"
    assert export_model.base_metadata(net, ck)["loss"] == "snr"
    assert "mag_weight" not in export_model.base_metadata(net, ck)  # nor does a zero magnitude term
    ck["config"].update(mag_weight=25.0, mag_power=0.3)
    meta = export_model.base_metadata(net, ck)
    assert (meta["mag_weight"], meta["mag_power"]) == (25.0, 0.3)


def test_parity_failure_is_refused(checkpoint, tmp_path):
    net, ck = export_model.load_checkpoint(checkpoint)
    path = export_model.export(net, tmp_path / "m.onnx", export_model.base_metadata(net, ck))
    with torch.no_grad():
        net.head.bias += 1.0  # the ONNX file no longer matches these weights
    with pytest.raises(SystemExit, match="differs from torch"):
        export_model.check_parity(net, path, dev_dir="")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        export_model.main(["--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / "x.onnx")])


def test_int8_export_runs_in_the_pipeline(checkpoint, tmp_path, dev_dir, capsys):
    out = tmp_path / "m.onnx"
    assert export_model.main(["--checkpoint", str(checkpoint), "--output", str(out), "--dev", str(dev_dir),
                              "--int8", "--int8-dev-files", "1"]) == 0
    assert (tmp_path / "m.int8.onnx").exists()
    text = capsys.readouterr().out
    assert "INT8 PESQ-WB change" in text and "hop_ms" in text


def test_floor_model_exports_with_its_memory_in_the_metadata(tmp_path, dev_dir, checkpoint):
    """A --floor-hops checkpoint exports a two-channel input and tells the pipeline K and the silence level;
    a plain one gets neither entry (older exports stay byte-identical)."""
    torch.manual_seed(2)
    net = M.UNet(8, in_ch=2)
    torch.save({"model": net.state_dict(), "config": {"base_ch": 8, "floor_hops": 20}, "epoch": 1},
               tmp_path / "floor.pt")
    out = tmp_path / "floor.onnx"
    assert export_model.main(["--checkpoint", str(tmp_path / "floor.pt"), "--output", str(out),
                              "--dev", str(dev_dir)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["floor_hops"] == "20" and float(meta["silent_log"]) == M.SILENT_LOG
    assert sess.get_inputs()[0].shape[:3] == [1, 2, 257]
    plain, ck = export_model.load_checkpoint(checkpoint)
    assert not {"floor_hops", "silent_log"} & set(export_model.base_metadata(plain, ck))


def test_several_checkpoints_export_their_average(checkpoint, tmp_path):
    """--checkpoint A B exports the mean of the two weight sets; the metadata names both."""
    ck = torch.load(checkpoint, weights_only=False)
    other = dict(ck, model={k: v * 3 if v.is_floating_point() else v for k, v in ck["model"].items()})
    torch.save(other, tmp_path / "other.pt")
    out = tmp_path / "avg.onnx"
    assert export_model.main(["--checkpoint", str(checkpoint), str(tmp_path / "other.pt"), "--output", str(out),
                              "--dev", ""]) == 0
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["averaged_from"]) == [str(checkpoint), str(tmp_path / "other.pt")]
    assert "dev_metrics" not in meta  # no validation ever scored the average as one checkpoint
    net, _ = export_model.load_checkpoint([checkpoint, tmp_path / "other.pt"])
    assert torch.allclose(net.state_dict()["e1.0.weight"], 2 * ck["model"]["e1.0.weight"])
    with pytest.raises(SystemExit, match="not found"):
        export_model.main(["--checkpoint", str(checkpoint), str(tmp_path / "none.pt"), "--output", str(out)])
    torch.save({"model": M.UNet(16).state_dict(), "config": {"base_ch": 16}}, tmp_path / "wide.pt")
    with pytest.raises(SystemExit, match="not the same model"):
        export_model.load_checkpoint([checkpoint, tmp_path / "wide.pt"])


def test_plain_export_rebuilds_the_shipped_model(tmp_path):
    """export_model.py's default checkpoint is the shipped model's: exported again it gives denoiser.onnx (to
    float32 rounding), so the committed model is what the committed weights make."""
    import export_model
    out = tmp_path / "again.onnx"
    assert export_model.main(["--output", str(out)]) == 0
    assert_same_model(out, REPO / "denoiser.onnx")


def test_streaming_export_rebuilds_the_shipped_low_latency_model(tmp_path):
    """The committed streaming checkpoint re-exports denoiser_lowlatency.onnx, with its metadata."""
    import json
    import onnx
    import export_model
    out = tmp_path / "again.onnx"
    assert export_model.main(["--checkpoint", str(REPO / "checkpoints" / "stream_erb" / "best.pt"),
                              "--output", str(out)]) == 0
    assert_same_model(out, REPO / "denoiser_lowlatency.onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["kind"] == "stream" and meta["window"] == "sqrt-hann"
    assert (meta["n_fft"], meta["stft_hop_samp"]) == ("512", "256")
    # The state: a running mean per model input (65 bins kept + 48 ERB bands) and the two GRUs' hidden states.
    assert int(meta["state_size"]) == 65 + 48 + 2 * int(meta["hidden"]) and json.loads(meta["parameters"]) <= 500_000
    with pytest.raises(SystemExit, match="--int8 is for the U-Net"):
        export_model.main(["--checkpoint", str(REPO / "checkpoints" / "stream_erb" / "best.pt"), "--int8",
                           "--output", str(tmp_path / "x.onnx")])
