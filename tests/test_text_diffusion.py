import math

import pytest
import torch

from unnoise.modalities.text.diffusion_lm import WordEmbedding, clamping, diffusion_lm_loss, infill, text_denoiser
from unnoise.schedules import make_schedule

B, L, V, E = 3, 5, 11, 4


def _embedding(init_std: float = 1.0) -> WordEmbedding:
    return WordEmbedding(V, E, init_std=init_std).double()


def _separated() -> WordEmbedding:
    """Rows far apart (distance >= 10), so rounding the embedding gives back its id exactly."""
    emb = WordEmbedding(V, V).double()
    with torch.no_grad():
        emb.weight.copy_(10 * torch.eye(V, dtype=torch.float64))
    return emb


def test_logits_are_minus_squared_distance_and_round_is_nearest():
    emb = _embedding()
    x = torch.randn(B, L, E, dtype=torch.float64)
    d2 = torch.cdist(x.reshape(-1, E), emb.weight) ** 2
    torch.testing.assert_close(emb.logits(x).reshape(-1, V), -d2, rtol=0, atol=1e-10)
    assert torch.equal(emb.round(x).reshape(-1), d2.argmin(-1))
    assert emb.logits(x).shape == (B, L, V)


def test_round_inverts_embed_for_a_separated_table():
    emb = _separated()
    ids = torch.randint(0, V, (B, L))
    assert torch.equal(emb.round(emb.embed(ids)), ids)
    assert torch.equal(emb.round(emb.embed(ids) + 0.1 * torch.randn(B, L, V, dtype=torch.float64)), ids)


def test_default_init_scale():
    w = WordEmbedding(1000, 64).weight
    assert abs(w.std().item() - 1.0) < 0.02
    w = WordEmbedding(1000, 64, init_std=64**-0.5).weight
    assert abs(w.pow(2).sum(-1).mean().item() - 1.0) < 0.05


def _exact_net(x0, calls=None):
    def net(x_t, t, cond):
        if calls is not None:
            calls.append((t.clone(), cond))
        return x0

    return net


def test_loss_of_a_perfect_net_has_zero_mse_and_embed():
    schedule = make_schedule("sqrt", 50)
    emb = _embedding()
    ids = torch.randint(0, V, (B, L))
    t = torch.tensor([1, 7, 50])
    noise = torch.randn(B, L, E, dtype=torch.float64)
    cond = torch.randint(0, 4, (B, 2))
    calls = []
    terms = diffusion_lm_loss(_exact_net(emb.embed(ids).detach(), calls), emb, ids, schedule, t, noise, cond)
    assert terms.mse.shape == terms.embed.shape == terms.rounding.shape == terms.loss.shape == (B,)
    assert torch.equal(terms.mse, torch.zeros(B, dtype=torch.float64))
    assert torch.equal(terms.embed, torch.zeros(B, dtype=torch.float64))
    assert torch.isfinite(terms.rounding).all() and (terms.rounding > 0).all()
    torch.testing.assert_close(terms.loss, terms.rounding)
    ((t_seen, cond_seen),) = calls
    assert t_seen.dtype == torch.float64 and torch.equal(t_seen, t.double())
    assert cond_seen is cond


def test_loss_terms_match_the_definitions_and_train_the_embedding():
    schedule = make_schedule("sqrt", 50)
    emb = _embedding()
    lin = torch.nn.Linear(E, E).double()
    ids = torch.randint(0, V, (B, L))
    t = torch.tensor([1, 1, 30])
    noise = torch.randn(B, L, E, dtype=torch.float64)
    terms = diffusion_lm_loss(lambda x, t, c: lin(x), emb, ids, schedule, t, noise)
    x0 = emb.weight[ids].detach()
    ab = schedule.alpha_bar[t].reshape(-1, 1, 1)
    err = ((lin(ab.sqrt() * x0 + (1 - ab).sqrt() * noise) - x0) ** 2).mean((1, 2)).detach()
    torch.testing.assert_close(terms.embed.detach(), torch.tensor([err[0], err[1], 0], dtype=torch.float64))
    torch.testing.assert_close(terms.mse.detach(), torch.tensor([0, 0, err[2]], dtype=torch.float64))
    d2 = torch.cdist(x0.reshape(-1, E), emb.weight.detach()) ** 2
    nll = torch.nn.functional.cross_entropy(-d2, ids.reshape(-1), reduction="none").reshape(B, L).mean(1)
    torch.testing.assert_close(terms.rounding.detach(), nll)
    assert (terms.loss > terms.rounding).all()
    terms.loss.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    assert lin.weight.grad.abs().sum() > 0


def test_loss_rejects_bad_input():
    schedule = make_schedule("sqrt", 10)
    emb = _embedding()
    ids = torch.randint(0, V, (B, L))
    noise = torch.randn(B, L, E, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    net = _exact_net(torch.zeros(B, L, E, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        diffusion_lm_loss(net, emb, ids + V, schedule, t, noise)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion_lm_loss(net, emb, ids, schedule, t, noise[:, :-1])
    with pytest.raises(ValueError, match="1..10"):
        diffusion_lm_loss(net, emb, ids, schedule, torch.tensor([0, 2, 3]), noise)
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion_lm_loss(net, emb, ids, schedule, t[:2], noise)
    with pytest.raises(ValueError, match="net output shape"):
        diffusion_lm_loss(_exact_net(torch.zeros(B, L, E + 1)), emb, ids, schedule, t, noise)
    with pytest.raises(ValueError, match="ids must"):
        diffusion_lm_loss(net, emb, ids.double(), schedule, t, noise)
    with pytest.raises(ValueError, match="x must have shape"):
        emb.logits(torch.zeros(B, L, E + 1))
    with pytest.raises(ValueError, match="dim"):
        WordEmbedding(V, 0)


def test_text_denoiser_with_an_exact_net_returns_x0():
    schedule = make_schedule("sqrt", 100)
    x0 = torch.randn(B, L, E, dtype=torch.float64)
    cond = torch.randint(0, 4, (B, 2))
    seen = []

    def net(x_t, t, c):
        seen.append(c)
        assert x_t.shape == (B, L, E) and t.shape == (B,)
        return x0

    denoise = text_denoiser(net, schedule, cond)
    for sigma in (0.05, 1.0, torch.tensor([0.1, 2.0, 30.0], dtype=torch.float64)):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        x = x0 + s * torch.randn_like(x0)
        torch.testing.assert_close(denoise(x, sigma), x0, rtol=0, atol=1e-10)
    assert all(c is cond for c in seen)


def test_clamping_returns_embedding_rows():
    emb = _embedding()
    x = torch.randn(B, L, E, dtype=torch.float64)

    def denoise(x, sigma):
        return 0.5 * x

    out = clamping(denoise, emb)(x, torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(out, emb.weight.detach()[emb.round(0.5 * x)])
    # sigma_max: only samples at sigma <= sigma_max are clamped.
    sigma = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    out = clamping(denoise, emb, sigma_max=1.0)(x, sigma)
    assert torch.equal(out[1], 0.5 * x[1])
    assert torch.equal(out[[0, 2]], emb.weight.detach()[emb.round(0.5 * x[[0, 2]])])
    with pytest.raises(ValueError, match="sigma_max"):
        clamping(denoise, emb, sigma_max=0.0)


def test_infill_keeps_known_positions_and_noises_the_input():
    emb = _embedding()
    ids = torch.randint(0, V, (B, L))
    known = emb.embed(ids).detach()
    mask = torch.rand(B, L) < 0.5
    mask[0, 0], mask[0, 1] = True, False
    seen = []

    def denoise(x, sigma):
        seen.append(x)
        return torch.full_like(x, 7.0)

    x = torch.randn(B, L, E, dtype=torch.float64)
    sigma = 0.3
    out = infill(denoise, mask, known, generator=torch.Generator().manual_seed(1))(x, torch.tensor(sigma))
    assert torch.equal(out[mask], known[mask])
    assert torch.equal(out[~mask], torch.full_like(out[~mask], 7.0))
    (x_in,) = seen
    assert torch.equal(x_in[~mask], x[~mask])
    z = (x_in[mask] - known[mask]) / sigma  # known + sigma z, z ~ N(0, 1)
    assert 0 < z.std().item() < 3 and math.isfinite(z.sum().item())
    with pytest.raises(ValueError, match="bool"):
        infill(denoise, mask.long(), known)
    with pytest.raises(ValueError, match="known must have shape"):
        infill(denoise, mask, known[:, :-1])


# --- the text ELBO (bits/token) ---------------------------------------------------------------


def _gaussian_case(T: int = 40, L: int = 3, E: int = 4):
    """One word, so -log p(w) = 0 and x0 ~ N(EMB(w), sigma0^2 I) is Gaussian: the optimal network,
    E[x0 | x_t], and the expected value of every term of the bound are closed forms."""
    schedule = make_schedule("sqrt", T)
    emb = WordEmbedding(1, E).double()
    with torch.no_grad():
        emb.weight.copy_(torch.linspace(-1.0, 2.0, E, dtype=torch.float64))
    ab = schedule.alpha_bar
    v0 = 1 - ab[1]
    mu = emb.weight[0]

    def net(x_t, t, cond):  # a perfect network: EMB(w), from which text_elbo forms E[x0 | x_t]
        return mu.expand_as(x_t)

    def posterior_var(t: int) -> float:
        return float(v0 * (1 - ab[t]) / (ab[t] * v0 + 1 - ab[t]))

    d = L * E
    c = (ab[:-1].sqrt() * (1 - ab[1:] / ab[:-1]) / (1 - ab[1:])) ** 2  # coef_x0^2, index t - 1
    bt = (1 - ab[:-1]) / (1 - ab[1:]) * (1 - ab[1:] / ab[:-1])  # beta_tilde, index t - 1
    expected = {
        "rounding": 0.0,
        "decoder": d * posterior_var(1) / (2 * v0) - d / 2,
        "diffusion": sum(d * posterior_var(t) * c[t - 1] / (2 * bt[t - 1]) for t in range(2, T + 1)).item(),
        "prior": 0.5 * (ab[T] * L * (mu.square().sum() + E * v0) + d * (-ab[T] - torch.log1p(-ab[T]))).item(),
    }
    return net, emb, schedule, torch.zeros(20000, L, dtype=torch.long), expected


@pytest.mark.parametrize("steps", [None, 7])
def test_text_elbo_terms_have_their_closed_form_means(steps):
    from unnoise.modalities.text.diffusion_lm import text_elbo

    net, emb, schedule, ids, expected = _gaussian_case()
    e = text_elbo(net, emb, ids, schedule, steps=steps, generator=torch.Generator().manual_seed(0))
    assert e.rounding.abs().max() < 1e-12  # one word: p(w | x0) = 1
    for name in ("decoder", "diffusion", "prior"):
        values = getattr(e, name)
        stderr = values.std().item() / math.sqrt(len(values))
        assert abs(values.mean().item() - expected[name]) < 4 * stderr + 1e-12, (name, values.mean(), expected[name])
    total = sum(expected.values())
    assert total >= 0  # a bound on -log p(w) = 0
    assert torch.allclose(e.nats, e.rounding + e.decoder + e.diffusion + e.prior)


def test_text_elbo_calls_the_network_once_per_stratum():
    from unnoise.modalities.text.diffusion_lm import text_elbo

    net, emb, schedule, ids, _ = _gaussian_case(T=12)
    for steps, strata in ((None, [[t] for t in range(2, 13)]), (11, [[t] for t in range(2, 13)]), (3, None)):
        seen: list[list[int]] = []

        def recording(x_t, t, cond, seen=seen):
            seen.append(t.long().tolist())
            return net(x_t, t, cond)

        text_elbo(recording, emb, ids[:50], schedule, steps=steps, generator=torch.Generator().manual_seed(3))
        assert seen[0] == [1] * 50  # the decoder term
        if strata is not None:  # strata of width 1: every t once, as in the full sum
            assert [sorted(set(s)) for s in seen[1:]] == strata
        else:  # 2..12 in 3 strata of about 11/3 steps: [2, 6), [6, 9), [9, 13)
            assert [(min(s), max(s)) for s in seen[1:]] == [(2, 5), (6, 8), (9, 12)]


def test_text_elbo_penalises_a_biased_network_by_its_closed_form_and_rejects_bad_input():
    from unnoise.diffusion import posterior_coefficients
    from unnoise.modalities.text.diffusion_lm import text_elbo

    net, emb, schedule, ids, _ = _gaussian_case()
    delta, d = 0.1, ids.shape[1] * emb.dim

    def biased(x_t, t, cond):
        return net(x_t, t, cond) + delta

    good, bad = (
        text_elbo(f, emb, ids[:4000], schedule, generator=torch.Generator().manual_seed(1)) for f in (net, biased)
    )
    # m -> m + delta moves x0_hat by delta (1 - sqrt(a) gain_t), independent of the draws:
    # each term grows by d (delta (1 - sqrt(a) gain_t))^2 times its weight
    post = posterior_coefficients(schedule.alpha_bar[1:], schedule.alpha_bar[:-1])
    a, v0 = schedule.alpha_bar[1:], 1 - schedule.alpha_bar[1]
    shift2 = (delta * (1 - a.sqrt() * a.sqrt() * v0 / (a * v0 + 1 - a))) ** 2  # index t - 1
    weights = torch.cat([1 / (2 * v0).view(1), post.coef_x0[1:] ** 2 / (2 * post.variance[1:])])
    expected = d * (shift2 * weights).sum().item()
    gap = bad.nats - good.nats  # paired: the same draws
    assert abs(gap.mean().item() - expected) < 4 * gap.std().item() / math.sqrt(len(gap)), (gap.mean(), expected)
    with pytest.raises(ValueError, match="steps must be"):
        text_elbo(net, emb, ids[:2], schedule, steps=40)
    with pytest.raises(ValueError, match="token ids"):
        text_elbo(net, emb, ids[:2] + 1, schedule)
