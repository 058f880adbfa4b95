"""The ADM U-Net: shapes, zero output at init, conditioning, gradient flow, attention placement, dtypes."""

from dataclasses import replace

import pytest
import torch

from unnoise.nets.unet import PRESETS, Attention, UNet, UNetConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny nets gain nothing from intra-op threads, and on a busy machine OpenMP's barriers cost
    # seconds per forward; restore the setting for the other test modules
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(image_size: int = 8, in_channels: int = 2, num_classes: int | None = None, **kw) -> UNetConfig:
    return replace(UNetConfig.preset("tiny", image_size, in_channels, num_classes), **kw)


def perturbed(cfg: UNetConfig, dtype=torch.float32) -> UNet:
    """A net whose zero-initialised layers (and GroupNorm affines) are moved off their init."""
    net = UNet(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(cfg: UNetConfig, batch: int = 3, dtype=torch.float32):
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=dtype)
    t = torch.rand(batch, dtype=dtype) * 1000
    return x, t


@pytest.mark.parametrize("learned_variance", [False, True])
def test_output_shape(learned_variance):
    cfg = tiny(learned_variance=learned_variance)
    x, t = inputs(cfg)
    out = UNet(cfg)(x, t)
    assert out.shape == (3, cfg.in_channels * (2 if learned_variance else 1), 8, 8)


def test_output_is_exactly_zero_at_init():
    cfg = tiny(num_classes=4)
    x, t = inputs(cfg)
    assert torch.equal(UNet(cfg)(x, t, torch.tensor([0, 1, 4])), torch.zeros_like(x))


def test_labels_condition_the_output_and_none_is_the_null_class():
    cfg = tiny(num_classes=4)
    net = perturbed(cfg)
    x, t = inputs(cfg)
    out = {k: net(x, t, torch.full((3,), k)) for k in range(5)}
    for a in range(5):
        for b in range(a):
            assert not torch.allclose(out[a], out[b], atol=1e-4), (a, b)
    torch.testing.assert_close(net(x, t), out[4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        perturbed(tiny())(x, t, torch.zeros(3, dtype=torch.long))


def test_noise_level_conditions_the_output_and_scalar_t_broadcasts():
    cfg = tiny()
    net = perturbed(cfg)
    x, _ = inputs(cfg)
    assert not torch.allclose(net(x, torch.full((3,), 10.0)), net(x, torch.full((3,), 500.0)), atol=1e-4)
    torch.testing.assert_close(net(x, torch.tensor(10.0)), net(x, torch.full((3,), 10.0)))


def test_samples_do_not_interact_across_the_batch():
    cfg = tiny()
    net = perturbed(cfg)
    x, t = inputs(cfg, batch=4)
    torch.testing.assert_close(net(x[1:2], t[1:2]), net(x, t)[1:2], atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    cfg = tiny(num_classes=4, learned_variance=True)
    net = perturbed(cfg)
    x, t = inputs(cfg, batch=5)
    net(x, t, torch.arange(5)).square().mean().backward()  # labels 0..4 touch every row, null id included
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_attention_runs_exactly_at_the_configured_resolutions():
    cfg = UNetConfig(16, 1, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,))
    net = UNet(cfg)
    sizes = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[-1]))
    net(*inputs(cfg, batch=1))
    # down: 2 res blocks at 8x8; up: 3 at 8x8; middle at 4x4 always has one
    assert sorted(sizes) == [4] + [8] * 5
    assert sum(isinstance(m, Attention) for m in net.modules()) == 6


def test_attention_matches_a_per_head_softmax():
    att = Attention(8, num_heads=2)
    torch.nn.init.normal_(att.proj.weight)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = att.qkv(att.norm(x)).flatten(2).chunk(3, dim=1)  # 3 x (B, C, HW), heads are blocks of C
    heads = []
    for s in (slice(0, 4), slice(4, 8)):
        w = torch.softmax(q[:, s].transpose(1, 2) @ k[:, s] / 2.0, dim=-1)  # (B, HW, HW), 1/sqrt(4)
        heads.append(v[:, s] @ w.transpose(1, 2))  # (B, 4, HW)
    ref = x + att.proj(torch.cat(heads, dim=1).reshape(x.shape))
    torch.testing.assert_close(att(x), ref)


def test_preset_parameter_counts():
    def count(name, size, channels):
        return sum(p.numel() for p in UNet(UNetConfig.preset(name, size, channels)).parameters())

    assert 10_000 < count("tiny", 8, 1) < 250_000
    assert 1_000_000 < count("small", 8, 1) == count("small", 28, 1) < 3_000_000
    assert 34_000_000 < count("cifar", 32, 3) < 40_000_000  # DDPM's CIFAR-10 model has 35.7M


def test_fashion_mnist_size_with_three_levels():
    cfg = UNetConfig.preset("small", 28, 1, num_classes=10)
    assert cfg.resolutions == (28, 14, 7) and cfg.attention_resolutions == (7,)
    net = perturbed(cfg)
    x, t = inputs(cfg, batch=2)
    assert net(x, t, torch.tensor([3, 10])).shape == x.shape


def test_channels_last_matches_contiguous():
    cfg = tiny(image_size=12, num_classes=3)
    net = perturbed(cfg)
    x, t = inputs(cfg)
    labels = torch.tensor([0, 2, 3])
    ref = net(x, t, labels)
    net_cl = perturbed(cfg).to(memory_format=torch.channels_last)
    net_cl.load_state_dict(net.state_dict())
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t, labels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_close_to_fp32():
    cfg = tiny(num_classes=3)
    net = perturbed(cfg)
    x, t = inputs(cfg)
    ref = net(x, t, torch.tensor([0, 1, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, torch.tensor([0, 1, 2]))
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per op); over ~20 layers a few percent of the
    # output's scale is the expected drift, while a wiring bug would be O(1)
    err = (out.float() - ref).norm() / ref.norm()
    assert out.isfinite().all() and err < 0.05, err


def test_float64():
    cfg = tiny(num_classes=3, learned_variance=True)
    net = perturbed(cfg, dtype=torch.float64)
    x, t = inputs(cfg, dtype=torch.float64)
    out = net(x, t, torch.tensor([0, 1, 3]))
    assert out.dtype == torch.float64 and out.shape == (3, 4, 8, 8)
    net32 = UNet(cfg).eval()
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    torch.testing.assert_close(net32(x.float(), t.float(), torch.tensor([0, 1, 3])), out.float(), atol=1e-4, rtol=1e-4)


def test_bad_configs_name_what_is_allowed():
    with pytest.raises(ValueError, match="multiples of 4"):
        UNetConfig(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match=r"allowed: \(28, 14, 7\)"):
        UNetConfig(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="allowed: " + ", ".join(PRESETS)):
        UNetConfig.preset("huge", 32, 3)
    with pytest.raises(ValueError, match="attention heads"):
        UNet(UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), attention_resolutions=(4,), num_heads=3))


def waveform(length: int = 64, num_classes: int | None = 3, **kw) -> UNetConfig:
    """A 1-D U-Net with 3 levels downsampling by 4: lengths (64, 16, 4), attention at 4."""
    size = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, num_heads=2, attention_resolutions=(4,))
    return UNetConfig(length, 1, num_classes=num_classes, **(size | dict(dims=1, factor=4) | kw))


def test_waveform_unet_shapes_levels_and_zero_at_init():
    cfg = waveform()
    assert cfg.resolutions == (64, 16, 4)
    x, t = torch.randn(2, 1, 64), torch.rand(2) * 100
    assert (UNet(cfg)(x, t, torch.tensor([0, 3])) == 0).all()
    lengths = []
    net = perturbed(cfg)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, Attention)):
            m.register_forward_hook(lambda mod, args, out: lengths.append(out.shape[-1]))
    out = net(x, t, torch.tensor([0, 3]))
    assert out.shape == x.shape and out.abs().min() > 0
    assert set(lengths) == {64, 16, 4}  # every layer runs at one of the three levels
    assert not any(isinstance(m, torch.nn.Conv2d) for m in net.modules())


def test_waveform_unet_downsampling_covers_every_input_sample():
    """Kernel 2f - 1 at stride f, padding f - 1: output j sees inputs f j - (f - 1) .. f j + (f - 1)."""
    from unnoise.nets.unet import Downsample, Upsample

    down, up = Downsample(1, dims=1, factor=4), Upsample(1, dims=1, factor=4)
    x = torch.zeros(1, 1, 16, requires_grad=True)
    down(x)[0, 0, 1].backward()
    assert x.grad[0, 0].nonzero().flatten().tolist() == list(range(1, 8))
    assert down(torch.randn(2, 1, 16)).shape == (2, 1, 4) and up(torch.randn(2, 1, 4)).shape == (2, 1, 16)


def test_waveform_unet_sees_the_whole_sequence_and_not_the_batch():
    cfg = waveform()
    net = perturbed(cfg)
    x = torch.randn(3, 1, 64, requires_grad=True)
    net(x, torch.rand(3) * 100, torch.tensor([0, 1, 2]))[0, 0, 0].backward()
    # sample 0 of clip 0 depends on the clip's last sample (attention spans the lowest level), not on clip 1
    assert x.grad[0, 0, -1] != 0 and (x.grad[1:] == 0).all()


def test_waveform_unet_float64_and_labels():
    cfg = waveform()
    net = perturbed(cfg, dtype=torch.float64)
    x, t = torch.randn(2, 1, 64, dtype=torch.float64), torch.rand(2, dtype=torch.float64) * 100
    out = net(x, t, torch.tensor([1, 2]))
    assert out.dtype == torch.float64
    assert not torch.allclose(out, net(x, t, torch.tensor([1, 3])))  # 3 is the null class


def test_bad_waveform_configs():
    with pytest.raises(ValueError, match="multiples of 16"):
        waveform(length=40)
    with pytest.raises(ValueError, match="dims must be 1"):
        waveform(dims=3)
    with pytest.raises(ValueError, match="factor must be >= 2"):
        waveform(factor=1)
