"""model.py: the spec U-Net's size, shapes and mask range, and the STFT contract."""
import pytest
import torch

import model as M


def test_parameter_count_near_spec():
    n = M.count_parameters(M.UNet())
    assert abs(n - 3.8e6) / 3.8e6 < 0.10, n


@pytest.mark.parametrize("frames", [1, 22, 25, 26, 100])
def test_any_number_of_frames(frames):
    net = M.UNet(8).eval()
    x = torch.randn(2, 1, 257, frames) * 4 - 6
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


def test_stft_window_gives_26_frames_and_inverts():
    x = torch.randn(3, 3200)
    spec = M.stft(x)
    assert spec.shape == (3, 257, 26)
    assert torch.allclose(M.istft(spec, 3200), x, atol=1e-5)


def test_enhance_with_unit_mask_is_identity():
    class Ones(torch.nn.Module):
        def forward(self, x):
            return torch.ones_like(x)
    x = torch.randn(2, 3200)
    out, mask = M.enhance(Ones(), x)
    assert mask.shape == (2, 257, 26) and torch.allclose(out, x, atol=1e-5)


def test_noise_floor_is_the_quietest_recent_hop_and_skips_digital_silence():
    """Per bin, the minimum over the K hops of each hop's mean over its window's newer half; a hop of zeros
    (start-up, muted mic) is skipped, and with only silence the current hop stands in."""
    logmag = torch.full((1, 4, 3, 26), -2.0)
    logmag[0, 1, 0, 13:] = -5.0   # hop 1 is quieter in bin 0, in the newer half
    logmag[0, 2, 1, :13] = -9.0   # the older half of a window does not count: hop 2 brought other audio
    assert torch.allclose(M.noise_floor(logmag), torch.tensor([[-5.0, -2.0, -2.0]]))
    logmag[0, 0] = -13.8          # digital silence: would otherwise be the floor
    assert torch.allclose(M.noise_floor(logmag), torch.tensor([[-5.0, -2.0, -2.0]]))
    silent = torch.full((1, 3, 3, 26), -13.8)
    assert torch.allclose(M.noise_floor(silent), torch.full((1, 3), -13.8))


def test_features_with_floor_end_in_the_last_window():
    x = torch.randn(2, 3 * 1600 + 3200)
    spec, feats = M.features(x, floor_hops=4, window=3200)
    assert torch.allclose(spec, M.stft(x[:, -3200:]), atol=1e-5)
    assert feats.shape == (2, 2, 257, 26)
    assert torch.allclose(feats[:, 0], M.log_magnitude(M.stft(x[:, -3200:]))[:, 0], atol=1e-5)
    assert (feats[:, 1] == feats[:, 1, :, :1]).all()  # the floor is one value per bin, repeated over time
    with pytest.raises(ValueError, match="not floor_hops=5"):
        M.features(x, floor_hops=5, window=3200)


def test_widened_input_starts_as_the_original_model():
    torch.manual_seed(0)
    net = M.UNet(8).eval()
    wide = M.UNet(8, in_ch=2).eval()
    wide.load_state_dict(M.widen_input(net.state_dict(), 2))
    x = torch.randn(1, 1, 257, 26) * 3 - 5
    with torch.no_grad():
        assert torch.equal(net(x), wide(torch.cat([x, torch.randn_like(x)], 1)))


def test_average_checkpoints_is_the_mean_of_the_weights(tmp_path):
    torch.manual_seed(0)
    nets = [M.UNet(8, in_ch=2) for _ in range(3)]
    cfg = {"base_ch": 8, "floor_hops": 4, "window_samp": 3200, "context_samp": 0}
    paths = []
    for i, net in enumerate(nets):
        paths.append(tmp_path / f"{i}.pt")
        torch.save({"model": net.state_dict(), "config": cfg, "epoch": i + 1, "metrics": {"dev_stoi": 0.8}}, paths[-1])
    ck = M.average_checkpoints(paths)
    w = "e1.0.weight"
    assert torch.allclose(ck["model"][w], (nets[0].e1[0].weight + nets[1].e1[0].weight + nets[2].e1[0].weight) / 3)
    assert torch.allclose(ck["model"]["e1.1.running_mean"], sum(n.e1[1].running_mean for n in nets) / 3)
    assert ck["config"] == cfg and ck["epoch"] == 1 and ck["metrics"] == {}
    torch.save({"model": nets[0].state_dict(), "config": dict(cfg, stoi_weight=60.0)}, tmp_path / "s60.pt")
    torch.save({"model": nets[1].state_dict(), "config": dict(cfg, stoi_weight=40.0)}, tmp_path / "s40.pt")
    mixed = M.average_checkpoints([tmp_path / "s60.pt", tmp_path / "s40.pt"])["config"]
    assert mixed["stoi_weight"] == [60.0, 40.0] and mixed["floor_hops"] == 4  # what differs is listed
    assert ck["averaged_from"] == [str(p) for p in paths]
    M.UNet(8, in_ch=2).load_state_dict(ck["model"])  # loads as a model
    one = M.average_checkpoints(paths[:1])  # one checkpoint averages to itself
    assert all(torch.equal(one["model"][k], v) for k, v in nets[0].state_dict().items())


def test_average_checkpoints_refuses_different_models(tmp_path):
    cfg = {"base_ch": 8, "floor_hops": 4, "window_samp": 3200, "context_samp": 0}
    torch.save({"model": M.UNet(8, in_ch=2).state_dict(), "config": cfg}, tmp_path / "a.pt")
    torch.save({"model": M.UNet(16, in_ch=2).state_dict(), "config": dict(cfg, base_ch=16)}, tmp_path / "wide.pt")
    torch.save({"model": M.UNet(8, in_ch=2).state_dict(), "config": dict(cfg, floor_hops=20)}, tmp_path / "k20.pt")
    for other in ("wide.pt", "k20.pt"):
        with pytest.raises(ValueError, match="not the same model"):
            M.average_checkpoints([tmp_path / "a.pt", tmp_path / other])


# --- the streaming model ---

def test_stream_model_is_within_the_parameter_budget():
    assert M.count_parameters(M.StreamNet()) <= 500_000
    assert M.count_parameters(M.StreamNet(180, mask="complex")) <= 500_000  # the complex mask's twice the outputs
    assert M.count_parameters(M.StreamNet(208, bands=48)) <= 500_000  # bands: the weights go to the GRUs
    assert M.count_parameters(M.StreamNet(200, bands=48, mask="complex", phase=True)) <= 500_000
    assert M.count_parameters(M.StreamNet(200, bands=48, head=16)) <= 500_000
    assert M.count_parameters(M.StreamNet(200, bands=48, head=16, band_gru=16)) <= 500_000


def test_erb_bands_keep_the_low_bins_and_share_every_high_bin_out():
    """The first STREAM_LINEAR_BINS bins map to themselves; above them every bin's weights sum to one and every
    band holds at least one bin, wider towards 8 kHz; a flat spectrum pools to itself and a band gain of one
    spreads back to a mask of one."""
    w = M.erb_bands(257, 48)
    lin = M.STREAM_LINEAR_BINS
    assert w.shape == (257, lin + 48)
    assert torch.equal(w[:lin, :lin], torch.eye(lin)) and not w[:lin, lin:].any() and not w[lin:, :lin].any()
    assert torch.allclose(w.sum(1), torch.ones(257))
    width = (w[lin:, lin:] > 0).sum(0)
    assert width.min() >= 1 and width[-2] > width[0]
    net = M.StreamNet(32, bands=48)
    flat = torch.full((1, 257), -3.0)
    assert torch.allclose(net.features(flat), torch.full((1, lin + 48), -3.0), atol=1e-5)
    assert torch.allclose(torch.ones(1, lin + 48) @ net.spread, torch.ones(1, 257))
    with pytest.raises(ValueError, match="bands is 0"):
        M.StreamNet(32, bands=193)


def test_complex_mask_turns_the_phase_and_a_unit_one_gives_the_input_back():
    """apply_mask multiplies a [.., 2, F] mask in as a complex gain: 1 + 0j is the input, 0 + 1j turns every
    bin a quarter turn, which the overlap-add hands back as a different waveform of the same energy."""
    spec = M.stream_frames(torch.randn(1, 8000))
    one = torch.zeros(*spec.shape[:-1], 2, spec.shape[-1])
    one[..., 0, :] = 1
    assert torch.allclose(M.apply_mask(spec, one), spec)
    quarter = one.flip(-2)
    turned = M.apply_mask(spec, quarter)
    assert torch.allclose(turned, spec * 1j) and torch.allclose(turned.abs(), spec.abs())
    with pytest.raises(ValueError, match="'real' or 'complex'"):
        M.StreamNet(32, mask="polar")


def test_stream_framing_with_unit_mask_gives_the_input_back():
    class Ones(torch.nn.Module):
        phase_bins = 0

        def forward(self, logmag, phase=None):
            return torch.ones_like(logmag)
    x = torch.randn(2, 16000)
    out, mask = M.enhance_stream(Ones(), x)
    assert mask.shape == (2, 16000 // M.STREAM_HOP_SAMP, M.STREAM_N_FFT // 2 + 1)
    assert out.shape[1] == 16000 // M.STREAM_HOP_SAMP * M.STREAM_HOP_SAMP - M.STREAM_HOP_SAMP
    assert torch.allclose(out, x[:, :out.shape[1]], atol=1e-5)


def _trained_head(net):
    """A head's and a per-band GRU's output layers start at zero (they add nothing yet): give them (and the rest
    of the head) weights to check."""
    for name in ("refine", "along_out"):
        for p in getattr(net, name).parameters() if hasattr(net, name) else ():
            torch.nn.init.normal_(p, std=0.3)
    return net


@pytest.mark.parametrize("kind,bands,phase,head,band_gru", [("real", 0, False, 0, 0), ("complex", 0, False, 0, 0),
                                                        ("real", 48, False, 0, 0), ("complex", 48, False, 0, 0),
                                                        ("complex", 48, True, 0, 0), ("real", 48, False, 8, 0),
                                                        ("real", 48, False, 8, 6)])
def test_stream_steps_equal_the_whole_utterance(kind, bands, phase, head, band_gru):
    """Frame by frame with the state carried equals one pass over the utterance, over more frames than the
    running mean's chunk (256), from a zero state and from a state left by earlier audio."""
    torch.manual_seed(0)
    net = _trained_head(M.StreamNet(32, mask=kind, bands=bands, phase=phase, head=head, band_gru=band_gru).eval())
    spec = M.stream_frames(torch.randn(2, 340 * M.STREAM_HOP_SAMP) * 0.1)
    logmag, ph = M.stream_log_magnitude(spec), M.stream_phase(spec, net.phase_bins) if phase else None
    at = lambda t: None if ph is None else ph[:, t]
    with torch.no_grad():
        whole = net(logmag[:, :300], phase=None if ph is None else ph[:, :300])
        state = torch.zeros(2, net.state_size)
        steps = []
        for t in range(300):
            mask, state = net.step(logmag[:, t], state, at(t))
            steps.append(mask)
        assert (torch.stack(steps, 1) - whole).abs().max() < 1e-5
        cont = net(logmag[:, 300:], state, None if ph is None else ph[:, 300:])
        for t in range(40):
            mask, state = net.step(logmag[:, 300 + t], state, at(300 + t))
            assert (mask - cont[:, t]).abs().max() < 1e-5
    if kind == "real":
        assert whole.min() >= 0 and whole.max() <= 1
    else:
        assert whole.shape == (2, 300, 2, 257)
        assert whole.square().sum(2).sqrt().max() < 1  # a complex gain's length: it can only remove


@pytest.mark.parametrize("mask,bands,head,band_gru", [("real", 0, 0, 0), ("complex", 0, 0, 0), ("real", 48, 0, 0),
                                                  ("real", 48, 8, 0), ("real", 48, 8, 6)])
def test_stream_model_is_causal(mask, bands, head, band_gru):
    """Changing frame 50 changes no mask before it."""
    net = _trained_head(M.StreamNet(hidden=32, mask=mask, bands=bands, head=head, band_gru=band_gru).eval())
    a = torch.randn(1, 80, 257)
    b = a.clone()
    b[:, 50] += 3
    with torch.no_grad():
        ma, mb = net(a), net(b)
    assert torch.equal(ma[:, :50], mb[:, :50]) and not torch.equal(ma[:, 50:], mb[:, 50:])


def test_convolution_head_starts_as_the_plain_model_and_sees_neighbouring_bands():
    """With its last layer at zero a head model gives exactly the mask of the same weights without the head;
    once trained, a change in one input's features moves the gains of its neighbours (up to 6 inputs away)
    and of nothing further. It refines a real mask only."""
    torch.manual_seed(0)
    plain, headed = M.StreamNet(32, bands=48).eval(), M.StreamNet(32, bands=48, head=8).eval()
    state = {k: v for k, v in headed.state_dict().items() if not k.startswith("refine")}
    w = plain.width
    state["out.weight"], state["out.bias"] = state["out.weight"][:w], state["out.bias"][:w]
    plain.load_state_dict(state)
    logmag = torch.randn(1, 30, 257) - 5
    with torch.no_grad():
        assert torch.equal(plain(logmag), headed(logmag))
        for p in headed.refine[-1].parameters():
            torch.nn.init.normal_(p)
        raw = torch.randn(1, 1, 3 * w)
        local = torch.randn(1, 1, 2 * w)
        moved = local.clone()
        moved[..., 20] += 1  # input 20's normalised log-magnitude
        delta = (headed.refined(raw, moved)[0] - headed.refined(raw, local)[0])[0, 0].abs()
        # Run as a Conv2d for speed, it is the Conv1d layers it holds
        as_declared = raw[..., :w] + headed.refine(torch.cat([raw, local], -1).reshape(1, 5, w)).reshape(1, 1, w)
        assert torch.allclose(headed.refined(raw, local)[0], as_declared, atol=1e-5)
    assert delta[14:27].gt(0).sum() >= 10 and not delta[:14].any() and not delta[27:].any()


def test_band_gru_starts_as_the_head_model_and_gives_each_band_a_memory():
    """With its output layer at zero a per-band GRU model gives exactly the head model's mask (so it can start
    from a head model's weights); once trained, a change in one input in one frame reaches that input's and its
    neighbours' later frames, with the rest of the model's memory held still, and no band beyond the
    convolution's reach. It needs a head."""
    torch.manual_seed(0)
    headed, banded = M.StreamNet(32, bands=48, head=8).eval(), M.StreamNet(32, bands=48, head=8, band_gru=6).eval()
    missing, unexpected = banded.load_state_dict(headed.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("along") for k in missing)
    logmag = torch.randn(1, 30, 257) - 5
    with torch.no_grad():
        assert torch.equal(headed(logmag), banded(logmag))
        _trained_head(banded)
        w = banded.width
        raw, local = torch.randn(1, 4, 3 * w), torch.randn(1, 4, 2 * w)
        moved = local.clone()
        moved[:, 0, 20] += 1  # input 20's normalised log-magnitude, in the first frame only
        h3 = torch.zeros(1, w, 6)
        delta = (banded.refined(raw, moved, h3)[0] - banded.refined(raw, local, h3)[0])[0].abs()
        plain = (headed.refined(raw, moved)[0] - headed.refined(raw, local)[0])[0].abs()
    assert not plain[1:].any()  # the head alone forgets the frame at once
    assert delta[1:, 14:27].gt(0).sum() >= 3 * 10 and not delta[:, :14].any() and not delta[:, 27:].any()
    with pytest.raises(ValueError, match="inside the convolution head"):
        M.StreamNet(32, bands=48, band_gru=8)
