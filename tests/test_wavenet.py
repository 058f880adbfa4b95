"""DiffWave: shapes, zero output at init, conditioning, receptive field, mel vocoder mode, dtypes, errors."""

from dataclasses import replace

import pytest
import torch

from unnoise.nets.wavenet import PRESETS, DiffWave, WaveNetConfig

N = 192  # waveform samples; a multiple of the mel hop used below


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> WaveNetConfig:
    return WaveNetConfig.preset("tiny", **kw)


def perturbed(cfg: WaveNetConfig, dtype=torch.float32) -> DiffWave:
    """A net whose zero-initialised output conv is moved off its init."""
    torch.manual_seed(0)
    net = DiffWave(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(batch: int = 3, n: int = N, dtype=torch.float32):
    return torch.randn(batch, 1, n, dtype=dtype), torch.rand(batch, dtype=dtype) * 50


def test_shapes_and_zero_at_init():
    net = DiffWave(tiny())
    x, t = inputs()
    out = net(x, t)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    assert net(x[:, 0], t).shape == (3, N)
    assert net(x, torch.tensor(3.0)).shape == x.shape  # a scalar t broadcasts over the batch


def test_depends_on_t_and_labels_and_null_class():
    net = perturbed(tiny(num_classes=4))
    x, t = inputs()
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        out = net(x, t, labels)
        assert not torch.allclose(out, net(x, t + 5.0, labels))
        assert not torch.allclose(out, net(x, t, torch.tensor([3, 3, 3])))
        assert torch.equal(net(x, t), net(x, t, torch.full((3,), 4)))  # None -> the null id num_classes


def test_receptive_field():
    cfg = tiny()
    half = (cfg.receptive_field - 1) // 2
    assert cfg.receptive_field == 1 + 2 * sum(cfg.dilations) and cfg.dilations == (1, 2, 4, 1, 2, 4)
    net = perturbed(cfg, torch.float64)
    x, t = inputs(1, dtype=torch.float64)
    i = 40
    with torch.no_grad():
        base = net(x, t)[0, 0]
        for offset, inside in [(half, True), (-half, True), (half + 1, False), (-half - 1, False)]:
            y = x.clone()
            y[0, 0, i + offset] += 1.0
            changed = net(y, t)[0, 0]
            assert (changed[i] != base[i]).item() == inside, offset
            # and nothing beyond the receptive field of the changed sample moves
            far = torch.ones(N, dtype=torch.bool)
            far[i + offset - half : i + offset + half + 1] = False
            assert torch.equal(changed[far], base[far])


def test_mel_conditioning():
    cfg = tiny(mel_bins=5, hop=12)
    net = perturbed(cfg)
    x, t = inputs()
    mel = torch.randn(3, 5, N // 12)
    assert net.conditioner(mel, x).shape == (3, 5, N)
    with torch.no_grad():
        out = net(x, t, mel=mel)
        assert out.shape == x.shape and net(x[:, 0], t, mel=mel).shape == (3, N)
        assert not torch.allclose(out, net(x, t, mel=mel + 1.0))
    with pytest.raises(ValueError, match=r"\(3, 5, 16\)"):
        net(x, t, mel=torch.randn(3, 5, 15))
    with pytest.raises(ValueError, match="multiple of hop"):
        net(x[..., :-1], t, mel=mel)
    with pytest.raises(ValueError, match="needs mel"):
        net(x, t)
    with pytest.raises(ValueError, match="without mel_bins"):
        DiffWave(tiny())(x, t, mel=mel)


def test_batch_independence():
    net = perturbed(tiny(num_classes=3, mel_bins=4, hop=4))
    x, t = inputs(4)
    labels, mel = torch.tensor([0, 1, 2, 3]), torch.randn(4, 4, N // 4)
    with torch.no_grad():
        full = net(x, t, labels, mel)
        for b in range(4):
            one = net(x[b : b + 1], t[b : b + 1], labels[b : b + 1], mel[b : b + 1])
            torch.testing.assert_close(one, full[b : b + 1])


def test_float64_and_gradients():
    net = perturbed(tiny(), torch.float64)
    x, t = inputs(dtype=torch.float64)
    x.requires_grad_(True)
    out = net(x, t)
    assert out.dtype == torch.float64
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    "name, kw, expected",
    [
        ("tiny", {}, 24_481),
        ("small", {}, 878_337),
        ("base", {}, 2_308_737),
        ("base", dict(num_classes=10), 2_314_369),
        ("base", dict(mel_bins=80), 2_619_971),  # the paper's vocoder: 2.64M
    ],
)
def test_preset_param_counts(name, kw, expected):
    cfg = WaveNetConfig.preset(name, **kw)
    assert sum(p.numel() for p in DiffWave(cfg).parameters()) == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="allowed: " + ", ".join(PRESETS)):
        WaveNetConfig.preset("huge")
    with pytest.raises(ValueError, match="num_classes"):
        WaveNetConfig(num_classes=0)
    with pytest.raises(ValueError, match="residual_layers"):
        replace(tiny(), residual_layers=0)
    net = DiffWave(tiny())
    x, t = inputs()
    with pytest.raises(ValueError, match=r"\(B, 1, N\) or \(B, N\)"):
        net(torch.randn(3, 2, N), t)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        net(x, torch.rand(2))
    with pytest.raises(ValueError, match="without num_classes"):
        net(x, t, torch.zeros(3, dtype=torch.long))
    cond = DiffWave(tiny(num_classes=2))
    with pytest.raises(ValueError, match="0..2"):
        cond(x, t, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="long tensor"):
        cond(x, t, torch.zeros(2, dtype=torch.long))
