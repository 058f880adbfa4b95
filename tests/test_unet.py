"""The ADM U-Net: shapes, zero output at init, conditioning, gradient flow, attention placement, dtypes."""

import math
from dataclasses import replace

import pytest
import torch

from unnoise.nets.layers import CrossAttention, Dropout, Pointwise1d, Pointwise2d, conv
from unnoise.nets.unet import PRESETS, Attention, Stage, UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_channel_major_attention_is_sdpa_in_its_layout():
    """float64: equal to torch's scaled_dot_product_attention, with and without a key mask; bf16 under
    autocast (scores rounded to bf16 before the softmax): within 1% of float64 (0.38%; SDPA 0.34%), logits of sd 4."""
    from unnoise.nets.layers import channel_major_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 8, n, dtype=torch.float64) * 2 for n in (10, 7, 7))  # (B, heads, d, N or L)
    mask = torch.rand(3, 7) < 0.6
    mask[:, 0] = True
    for m in (None, mask):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(-1, -2),
            k.transpose(-1, -2),
            v.transpose(-1, -2),
            attn_mask=None if m is None else m[:, None, None],
        )
        torch.testing.assert_close(channel_major_attention(q, k, v, m), sdpa.transpose(-1, -2))
    small = [t[:1, :, :3, :4].clone().requires_grad_() for t in (q, k, v)]  # the mask fills scores in place
    assert torch.autograd.gradcheck(lambda *qkv: channel_major_attention(*qkv, mask[:1, :4]), small)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = channel_major_attention(q.float(), k.float(), v.float(), mask)
    exact = channel_major_attention(q, k, v, mask)
    assert low.dtype == torch.bfloat16 and (low.double() - exact).norm() / exact.norm() < 0.01


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


@pytest.mark.parametrize("dims,factor", [(2, 2), (2, 3), (1, 2), (1, 4)])
def test_upsample_is_nearest_neighbour_then_its_conv(dims, factor):
    """The transposed conv equals the definition, values and gradients, at every border (float64)."""
    from unnoise.nets.unet import Upsample

    torch.manual_seed(0)
    up = Upsample(3, dims=dims, factor=factor).double()
    x = torch.randn(2, 3, *(5,) * dims, dtype=torch.float64)
    got = up(x)
    want = up.conv(torch.nn.functional.interpolate(x, scale_factor=float(factor), mode="nearest"))
    assert got.shape == want.shape == (2, 3, *(5 * factor,) * dims)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    grads = [
        torch.autograd.grad(out, up.conv.weight, g)[0]
        for out in (up(x), up.conv(torch.nn.functional.interpolate(x, scale_factor=float(factor), mode="nearest")))
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


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


# --- the cheaper layers: dropout from 16-bit draws, 1x1 convolutions as matmuls ---------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_a_fraction_p_and_keeps_the_mean(dtype):
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype)
    y = Dropout(0.1)(x)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 6554 / 65536) < 4 * (0.1 * 0.9 / x.numel()) ** 0.5  # 4 standard errors
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 65536 / (65536 - 6554)))
    # each of the four 16-bit words of a draw drops independently, so no position is favoured
    per_word = (y.reshape(-1, 4) == 0).double().mean(0)
    assert (per_word - 0.1).abs().max() < 4 * (0.1 * 0.9 / (x.numel() / 4)) ** 0.5


def test_dropout_masks_the_gradient_like_the_output_and_is_the_identity_in_eval():
    x = torch.randn(3, 5, 7, 11, requires_grad=True)  # numel not a multiple of 4
    drop = Dropout(0.3)
    torch.manual_seed(1)
    y = drop(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.where(y != 0, 65536 / (65536 - round(0.3 * 65536)), 0.0))
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y)  # the masks come from the global generator
    assert drop.eval()(x) is x and Dropout(0.0)(x) is x
    for p in (1.0, 1 - 2**-17, -0.1):  # 1 - 2^-17 rounds to P(drop) = 1
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Dropout(p)
    assert Dropout(1 - 2**-16)(torch.ones(64)).isfinite().all()  # the largest P(drop) below 1: 65535/65536


@pytest.mark.parametrize("dims", [1, 2])
def test_a_pointwise_conv_is_the_1x1_convolution(dims):
    torch.manual_seed(2)
    p = conv(dims, 6, 4, 1)
    assert isinstance(p, Pointwise1d if dims == 1 else Pointwise2d)
    ref = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(6, 4, 1)
    ref.load_state_dict(p.state_dict())  # same names and shapes: checkpoints load either way
    x = torch.randn(3, 6, *((9,) if dims == 1 else (5, 7)), dtype=torch.float64, requires_grad=True)
    p, ref = p.double(), ref.double()
    out, expected = p(x), ref(x)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, p.weight, p.bias])
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [x, ref.weight, ref.bias]), strict=True):
        torch.testing.assert_close(got, want)
    if dims == 2:  # a channels-last input gives the same numbers
        torch.testing.assert_close(p(x.contiguous(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 under autocast, as the convolution is
        y = p.float()(x.detach().float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=0.05, rtol=0.02)


# --- cross-attention to a context (LDM sec. 3.3) --------------------------------------------------------


def reference_config(**kw) -> UNetConfig:
    size = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2)
    return UNetConfig(8, 2, dropout=0.0, num_classes=3, **(size | kw))


def formula_weights(net: UNet) -> UNet:
    """Weights from a formula, not a random stream: the same on every machine and torch version."""
    with torch.no_grad():
        for k, (_, p) in enumerate(net.named_parameters()):
            p.copy_(0.2 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) * 0.37 + k).reshape(p.shape))
    return net


def test_without_context_dim_the_unet_is_the_one_before_cross_attention():
    """Names, shapes and outputs recorded from the U-Net before context_dim existed (commit 8fa0294)."""
    import hashlib

    net = formula_weights(UNet(reference_config()).double().eval())
    names = [(n, tuple(p.shape)) for n, p in net.state_dict().items()]
    assert len(names) == 129 and sum(p.numel() for p in net.parameters()) == 48674
    assert hashlib.sha256(repr(names).encode()).hexdigest().startswith("3c47a72b6859eeb80f6706462c711f1c")
    x = torch.cos(torch.arange(2 * 2 * 8 * 8, dtype=torch.float64) * 0.91).reshape(2, 2, 8, 8)
    out = net(x, torch.tensor([3.0, 700.0], dtype=torch.float64), torch.tensor([1, 3]))
    expected = torch.tensor(
        [[0.12494973845184955, 0.11891602114800913, 0.14653088495556352, 0.18530915534370773],
         [0.11414811633822816, 0.13123454366612697, 0.1383927200494378, 0.12201772342753792]],
        dtype=torch.float64,
    )  # fmt: skip
    torch.testing.assert_close(torch.stack([out[0, 0, 0, :4], out[1, 1, 7, 4:]]), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.sum().item(), 29.391376868030864, rtol=1e-9, atol=0)


def test_an_old_state_dict_loads_and_zero_cross_attention_changes_nothing():
    old = perturbed(reference_config())
    new = UNet(reference_config(context_dim=6)).eval()
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected
    cross = {n for n, m in new.named_modules() if isinstance(m, CrossAttention)}
    assert {k.rsplit(".", 2)[0] for k in missing} == cross and len(cross) == 4  # 4x4: down 1, middle 1, up 2
    assert all(".cross." in k for k in missing)
    # the cross-attention output projections start at zero: the loaded net is the old one, whatever the context
    x, t = inputs(reference_config())
    context = torch.randn(3, 5, 6)
    torch.testing.assert_close(new(x, t, torch.tensor([0, 1, 3]), context), old(x, t, torch.tensor([0, 1, 3])))
    UNet(reference_config()).load_state_dict(old.state_dict())  # and strictly into a net without context


def context_net(**kw) -> UNet:
    return perturbed(tiny(context_dim=6, **kw))


def test_context_shapes_and_one_cross_attention_per_self_attention():
    net = context_net(num_classes=3)
    x, t = inputs(net.config)
    out = net(x, t, torch.tensor([0, 1, 3]), torch.randn(3, 7, 6), torch.ones(3, 7, dtype=torch.bool))
    assert out.shape == x.shape
    n_self = sum(isinstance(m, Attention) for m in net.modules())
    assert n_self == sum(isinstance(m, CrossAttention) for m in net.modules()) > 0
    assert torch.equal(UNet(tiny(context_dim=6))(x, t, context=torch.randn(3, 7, 6)), torch.zeros_like(x))


def test_the_context_conditions_the_output_and_padded_tokens_do_not():
    net = context_net()
    x, t = inputs(net.config)
    context = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, context=context, context_mask=mask)
    assert not torch.allclose(out, net(x, t, context=torch.randn(3, 5, 6), context_mask=mask), atol=1e-4)
    garbage = torch.where(mask[..., None], context, 1e3 * torch.randn(3, 5, 6))
    torch.testing.assert_close(net(x, t, context=garbage, context_mask=mask), out)
    # a padded context is the same as the unpadded one, sample by sample
    for i, length in enumerate(mask.sum(1).tolist()):
        alone = net(x[i : i + 1], t[i : i + 1], context=context[i : i + 1, :length])
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)


def test_a_row_without_real_tokens_gets_no_cross_attention():
    net = context_net()
    x, t = inputs(net.config)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = net(x, t, context=torch.randn(3, 4, 6), context_mask=mask)
    assert out.isfinite().all()
    torch.testing.assert_close(out, net(x, t, context=torch.randn(3, 4, 6), context_mask=mask))
    for m in net.modules():
        if isinstance(m, CrossAttention):
            torch.nn.init.zeros_(m.proj.weight), torch.nn.init.zeros_(m.proj.bias)
    torch.testing.assert_close(net(x, t, context=torch.randn(3, 4, 6)), out)  # as if it had none


@pytest.mark.parametrize("positions", [0, 2])
def test_gradients_flow_to_the_real_tokens_of_the_context_only(positions):
    net = context_net(context_positions=positions)
    x, t = inputs(net.config)
    context = torch.randn(3, 5, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    net(x, t, context=context, context_mask=mask).square().sum().backward()
    assert (context.grad[:, :2].abs().sum(-1) > 0).all() and (context.grad[:, 2:] == 0).all()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_cross_attention_alone_at_sizes_without_self_attention():
    net = context_net(cross_attention_resolutions=(8,))  # self-attention (with cross-attention) at 4x4 only
    alone = [m for m in net.modules() if isinstance(m, Stage) and isinstance(m[-1], CrossAttention)]
    assert len(alone) == 1 + 2  # at 8x8: down 1 res block, up 2
    assert sum(isinstance(m, Attention) for m in net.modules()) == sum(
        isinstance(m, Attention) for m in context_net().modules()
    )
    for m in net.modules():  # silence the cross-attention inside self-attention: the prompt acts at 8x8 alone
        if isinstance(m, Attention):
            torch.nn.init.zeros_(m.cross.proj.weight), torch.nn.init.zeros_(m.cross.proj.bias)
    x, t = inputs(net.config)
    context = torch.randn(3, 5, 6, requires_grad=True)
    out = net(x, t, context=context)
    assert not torch.allclose(out, net(x, t, context=torch.randn(3, 5, 6)), atol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in alone for p in m[-1].parameters())
    assert (context.grad.abs().sum(-1) > 0).all()
    for bad in (dict(context_dim=None), dict(cross_attention_resolutions=(4,)), dict(cross_attention_resolutions=(2,))):
        with pytest.raises(ValueError, match=r"cross_attention_resolutions .* allowed"):
            tiny(**(dict(context_dim=6, cross_attention_resolutions=(8,)) | bad))


def test_cross_attention_matches_a_per_head_masked_softmax():
    att = CrossAttention(8, context_dim=3, num_heads=2)
    torch.nn.init.normal_(att.proj.weight)
    x, c = torch.randn(2, 8, 3, 5), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    q = att.q(att.norm(x)).flatten(2)  # (B, C, HW), heads are blocks of C
    k, v = att.kv(c).transpose(1, 2).chunk(2, dim=1)  # 2 x (B, C, L)
    heads = []
    for s in (slice(0, 4), slice(4, 8)):
        logits = q[:, s].transpose(1, 2) @ k[:, s] / 2.0  # (B, HW, L), 1/sqrt(4)
        w = torch.softmax(logits.masked_fill(~mask[:, None], float("-inf")), dim=-1)
        heads.append(v[:, s] @ w.transpose(1, 2))  # (B, 4, HW)
    ref = x + att.proj(torch.cat(heads, dim=1).reshape(x.shape))
    torch.testing.assert_close(att(x, c, mask), ref)


def test_position_features_are_fourier_features_of_the_centres_in_row_major_order():
    att = CrossAttention(8, context_dim=3, num_heads=2, positions=2)
    phi = att.position_features((2, 4))  # rows at -1/2, 1/2; columns at -3/4, -1/4, 1/4, 3/4
    assert phi.shape == (8, 8)
    y, x = torch.tensor(0.5), torch.tensor(-0.25)  # row 1, column 1: position 5
    angles = torch.stack([y * math.pi, y * 2 * math.pi, x * math.pi, x * 2 * math.pi]).reshape(2, 2)
    torch.testing.assert_close(phi[5], torch.cat([angles.sin(), angles.cos()], dim=-1).flatten())


def test_positional_queries_start_as_none_and_add_w_p_phi_to_every_query():
    torch.manual_seed(0)
    plain, placed = CrossAttention(8, 3, 2), CrossAttention(8, 3, 2, positions=3)
    assert placed.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["pos.weight"]
    x, c = torch.randn(2, 8, 3, 5), torch.randn(2, 4, 3)
    torch.nn.init.normal_(plain.proj.weight), placed.proj.load_state_dict(plain.proj.state_dict())
    torch.testing.assert_close(placed(x, c), plain(x, c))  # W_P starts at zero
    torch.nn.init.normal_(placed.pos.weight)
    q = placed.q(placed.norm(x)).flatten(2) + placed.pos(placed.position_features((3, 5))).T  # (B, C, HW)
    k, v = placed.kv(c).transpose(1, 2).chunk(2, dim=1)
    heads = [
        v[:, s] @ torch.softmax(q[:, s].transpose(1, 2) @ k[:, s] / 2.0, -1).transpose(1, 2)
        for s in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close(placed(x, c), x + placed.proj(torch.cat(heads, dim=1).reshape(x.shape)))
    with pytest.raises(ValueError, match="positions"):
        CrossAttention(8, 3, 2, positions=-1)
    with pytest.raises(ValueError, match="context_positions"):
        tiny(context_positions=2)


def test_a_context_the_unet_cannot_take_is_refused_in_one_line():
    x, t = inputs(tiny())
    with pytest.raises(ValueError, match="without context_dim"):
        perturbed(tiny())(x, t, context=torch.randn(3, 2, 6))
    net = context_net()
    for context in (None, torch.randn(3, 2, 5), torch.randn(2, 2, 6), torch.randn(3, 6)):
        with pytest.raises(ValueError, match=r"context of shape \(3, L, 6\)"):
            net(x, t, context=context)
    with pytest.raises(ValueError, match="context_mask must be bool"):
        net(x, t, context=torch.randn(3, 2, 6), context_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="context_dim must be None"):
        tiny(context_dim=0)
    from unnoise.schema import from_dict

    assert (
        from_dict(
            UNetConfig, {"image_size": 8, "channel_mults": [1, 2], "attention_resolutions": [4]}, "old config.json"
        ).context_dim
        is None
    )
