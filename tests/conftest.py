"""Shared fixtures: paths, real ONNX models made on the spot, and real dev audio from ../shared."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Started as a background job from a script (`bash tests/run_all.sh &`), this process inherits SIGINT ignored,
# and an ignored signal stays ignored across exec: every child the tests send Ctrl+C to would never see it. A
# handler (unlike SIG_IGN) is reset to the default in each child, so installing Python's own one here gives
# every child a default SIGINT, however the suite was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEV = SHARED / "data" / "dev"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The private PipeWire server and its virtual devices (tests/sound_server.py), shared by every test file.
from sound_server import cable, fake_mic, probe, sound_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def dev_dir():
    if not (DEV / "clean").is_dir():
        pytest.skip(f"dev set not found at {DEV} (../shared beside the checkout)")
    return DEV


@pytest.fixture(scope="session")
def random_net():
    """A real U-Net from model.py with random weights (base_ch 8)."""
    import torch
    import model
    torch.manual_seed(0)
    return model.UNet(8).eval()


@pytest.fixture(scope="session")
def random_model(random_net, tmp_path_factory):
    """random_net exported by export_model.py: the chain must not care which model it runs."""
    import export_model
    path = tmp_path_factory.mktemp("models") / "random.onnx"
    export_model.export(random_net, path, export_model.base_metadata(random_net))
    return path


@pytest.fixture(scope="session", params=["real", "complex-bands"])
def stream_net(request):
    """A real streaming model from model.py with random weights (hidden 32), its weights scaled so the mask
    varies between 0 and 1 instead of sitting at 0.5: the shipped kind (a real mask on every bin), and a complex
    mask on ERB bands (whose pooling and spreading the ONNX graph must carry)."""
    import torch
    import model
    torch.manual_seed(1)
    mask, bands = ("real", 0) if request.param == "real" else ("complex", 24)
    net = model.StreamNet(hidden=32, mask=mask, bands=bands).eval()
    with torch.no_grad():
        net.out.weight.mul_(8)
    return net


@pytest.fixture(scope="session")
def stream_model(stream_net, tmp_path_factory):
    """stream_net exported by export_model.py (one frame's step, the state explicit)."""
    import export_model
    path = tmp_path_factory.mktemp("models") / "stream.onnx"
    export_model.export(stream_net, path, export_model.base_metadata(stream_net))
    return path


def tiny_onnx(path, bins=257, value=1.0, metadata=None):
    """An ONNX graph mapping [1, 1, bins, T] to a constant mask of the same shape (mask forced to `value`: a
    number, or an array that broadcasts against the input, e.g. [1, 1, 1, T] for a mask that varies over frames)."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("logmag", TensorProto.FLOAT, [1, 1, bins, "T"])
    y = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, bins, "T"])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    val = helper.make_tensor("val", TensorProto.FLOAT, np.shape(value), np.ravel(value).tolist())
    nodes = [helper.make_node("Mul", ["logmag", "zero"], ["z"]), helper.make_node("Add", ["z", "val"], ["mask"])]
    graph = helper.make_graph(nodes, "const_mask", [x], [y], initializer=[zero, val])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def ones_model(tmp_path_factory):
    return tiny_onnx(tmp_path_factory.mktemp("models") / "ones.onnx", value=1.0,
                     metadata={"sample_rate": 16000, "n_fft": 512, "stft_hop_samp": 128})


@pytest.fixture(scope="session")
def tiny_onnx_factory():
    return tiny_onnx


@pytest.fixture(scope="session")
def dev_pair(dev_dir):
    import soundfile as sf
    name = sorted((dev_dir / "noisy").glob("*.wav"))[0].name
    noisy, _ = sf.read(dev_dir / "noisy" / name, dtype="float32")
    clean, _ = sf.read(dev_dir / "clean" / name, dtype="float32")
    return name, noisy, clean


def tone(freq, seconds, amp=0.1, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(seconds, rate=16000, seed=0, dbfs=-25.0):
    """Noise shaped by a syllable-rate envelope: broadband like speech, with its 4 Hz on/off rhythm."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * np.arange(n) / rate)
    x = rng.standard_normal(n) * env
    x *= 10 ** (dbfs / 20) / np.sqrt(np.mean(x ** 2))
    return x.astype(np.float32)


def run_script(script, *args, timeout=300):
    """Run one of the repo's scripts the way a user does; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def voiced(seconds, rate=16000, seed=0):
    """A speech stand-in with what a mask can learn from: harmonics of a gliding pitch, in syllables."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 20))
    env = np.clip(np.sin(2 * np.pi * 3 * t + rng.random() * 6), 0, None)
    return (0.1 * x * env).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """speech/ and noise/ folders in the shared-data layout, mixed formats and rates, plus a paired dev/."""
    import soundfile as sf
    root = tmp_path_factory.mktemp("corpus")
    (root / "speech" / "a").mkdir(parents=True)
    (root / "noise").mkdir()
    for i in range(6):
        sf.write(root / "speech" / "a" / f"s{i}.flac", voiced(2.0, seed=i), 16000)
    sf.write(root / "speech" / "short.wav", voiced(0.1, seed=9), 16000)  # shorter than a window
    stereo48 = np.stack([voiced(1.5, 48000, seed=7)] * 2, axis=1)
    sf.write(root / "speech" / "s48k.wav", stereo48, 48000)
    rng = np.random.default_rng(0)
    sf.write(root / "noise" / "white.ogg", (0.05 * rng.standard_normal(32000)).astype(np.float32), 16000)
    brown = np.cumsum(rng.standard_normal(48000)).astype(np.float32)
    sf.write(root / "noise" / "brown.wav", 0.3 * brown / np.abs(brown).max(), 16000)
    sf.write(root / "noise" / "silent.wav", np.zeros(16000, np.float32), 16000)
    for sub in ("clean", "noisy"):
        (root / "dev" / sub).mkdir(parents=True)
    for i in range(2):
        clean = voiced(1.0, seed=20 + i)
        sf.write(root / "dev" / "clean" / f"d{i}.wav", clean, 16000)
        sf.write(root / "dev" / "noisy" / f"d{i}.wav", clean + 0.03 * rng.standard_normal(len(clean)), 16000)
    return root
