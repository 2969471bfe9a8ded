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
