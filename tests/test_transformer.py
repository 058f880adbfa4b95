"""The Diffusion-LM transformer: shapes, zero output at init, conditioning, non-causality, dtypes, presets."""

from dataclasses import replace

import pytest
import torch

from unnoise.nets.transformer import PRESETS, TextTransformer, TransformerConfig

VOCAB, COND_LEN = 11, 5


def tiny(cond: bool = True, **kw) -> TransformerConfig:
    cfg = TransformerConfig.preset("tiny", 12, 8, VOCAB if cond else None, COND_LEN if cond else 0)
    return replace(cfg, **kw)


def perturbed(cfg: TransformerConfig, dtype=torch.float32) -> TextTransformer:
    """A net whose zero-initialised output layer (and every other weight) is moved off its init."""
    torch.manual_seed(0)
    net = TextTransformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(cfg: TransformerConfig, batch: int = 3, length: int | None = None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, length or cfg.seq_len, cfg.embed_dim, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype) * 1000
    cond = torch.randint(1, VOCAB, (batch, COND_LEN), generator=g)
    return x, t, cond


def test_shape_and_zero_at_init():
    cfg = tiny()
    net = TextTransformer(cfg).eval()
    for length in (cfg.seq_len, 5):
        x, t, cond = inputs(cfg, length=length)
        out = net(x, t, cond)
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(x))
    assert net(x, torch.tensor(3.0)).shape == x.shape  # scalar t broadcasts


def test_depends_on_t_and_cond():
    cfg = tiny()
    net = perturbed(cfg)
    x, t, cond = inputs(cfg)
    with torch.no_grad():
        out = net(x, t, cond)
        assert not torch.allclose(out, net(x, t + 1.0, cond), atol=1e-4)
        assert not torch.allclose(out, net(x, t, cond.roll(1, dims=1)), atol=1e-4)
        assert not torch.allclose(out, net(x, t, torch.zeros_like(cond)), atol=1e-4)


def test_null_and_padded_cond():
    cfg = tiny()
    net = perturbed(cfg)
    x, t, cond = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, None), net(x, t, torch.zeros_like(cond)))
        torch.testing.assert_close(net(x, t, None), net(x, t, cond[:, :0]))
        short = cond[:, :3]
        padded = torch.cat([short, torch.zeros_like(cond[:, :2])], dim=1)
        torch.testing.assert_close(net(x, t, short), net(x, t, padded))
        # padding in the middle of a sample is ignored too (and only in that sample)
        holes = cond.clone()
        holes[0, 1] = 0
        other = holes.clone()
        other[0, 1] = 7  # a different real token would change sample 0 ...
        a, b = net(x, t, holes), net(x, t, other)
        assert not torch.allclose(a[0], b[0], atol=1e-4)
        torch.testing.assert_close(a[1:], b[1:])  # ... and only sample 0


def test_non_causal():
    cfg = tiny()
    net = perturbed(cfg)
    x, t, cond = inputs(cfg)
    y = x.clone()
    y[:, -1] += 1.0  # change the last position only
    with torch.no_grad():
        a, b = net(x, t, cond), net(y, t, cond)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)  # the first position sees it


def test_permutation_equivariance_without_positions():
    # with positional embeddings zeroed the net is a set function: permuting x permutes the output
    cfg = tiny()
    net = perturbed(cfg)
    with torch.no_grad():
        net.pos.zero_()
    x, t, cond = inputs(cfg)
    perm = torch.randperm(cfg.seq_len, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net(x[:, perm], t, cond), net(x, t, cond)[:, perm], atol=1e-5, rtol=1e-5)


def test_batch_independence():
    cfg = tiny()
    net = perturbed(cfg)
    x, t, cond = inputs(cfg, batch=4)
    cond[2, 3:] = 0  # mixed padding across the batch
    with torch.no_grad():
        full = net(x, t, cond)
        for i in range(4):
            torch.testing.assert_close(full[i : i + 1], net(x[i : i + 1], t[i : i + 1], cond[i : i + 1]))


def test_float64():
    cfg = tiny()
    net = perturbed(cfg, torch.float64)
    x, t, cond = inputs(cfg, dtype=torch.float64)
    out = net(x, t, cond)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_unconditional():
    cfg = tiny(cond=False)
    net = perturbed(cfg)
    x, t, cond = inputs(cfg)
    assert net(x, t).shape == x.shape
    with pytest.raises(ValueError, match="without cond_vocab"):
        net(x, t, cond)


def test_gradient_reaches_every_parameter():
    cfg = tiny()
    net = perturbed(cfg)
    x, t, cond = inputs(cfg)
    net(x, t, cond).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_preset_sizes():
    def count(name: str) -> int:
        return sum(p.numel() for p in TextTransformer(TransformerConfig.preset(name, 64, 16, 100, 8)).parameters())

    assert count("tiny") < 100_000
    assert 8e6 < count("small") < 12e6
    assert 25e6 < count("base") < 30e6
    with pytest.raises(ValueError, match="allowed: tiny, small, base"):
        TransformerConfig.preset("huge", 64, 16)
    assert PRESETS == ("tiny", "small", "base")


def test_bad_shapes():
    cfg = tiny()
    net = TextTransformer(cfg)
    x, t, cond = inputs(cfg)
    with pytest.raises(ValueError, match="seq_len=12"):
        net(torch.randn(3, cfg.seq_len + 1, cfg.embed_dim), t)
    with pytest.raises(ValueError, match="embed_dim=8"):
        net(torch.randn(3, 4, cfg.embed_dim + 1), t)
    with pytest.raises(ValueError, match=r"\(B, L, embed_dim"):
        net(torch.randn(3, cfg.embed_dim), t)
    with pytest.raises(ValueError, match="cond_len=5"):
        net(x, t, torch.ones(3, COND_LEN + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        net(x, t, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        net(x, t, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        net(x, t, torch.ones(3, 2))
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, torch.zeros(2))
    with pytest.raises(ValueError, match="heads"):
        replace(cfg, heads=3)
