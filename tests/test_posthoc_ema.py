"""Post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3 / App. C) against its closed forms, then end to end.

The closed forms: sigma_rel of the density (gamma + 1) tau^gamma on [0, 1] (Eq. 123, checked by
quadrature); the power EMA's unrolled weights (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1);
the profiles' inner products (Eq. 151, checked by quadrature); and the reconstruction of a profile
that was never tracked against the same profile tracked directly, on a synthetic trajectory (float64).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unnoise.cli.main import main
from unnoise.training import integrity
from unnoise.training.config import TrainConfig
from unnoise.training.posthoc_ema import (
    SIGMA_REL_MAX,
    PowerEMA,
    Snapshot,
    find_snapshots,
    gamma_to_sigma_rel,
    power_weights,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)

f64 = torch.float64


@pytest.mark.parametrize("gamma", [0.3, 1.0, 6.94, 16.97, 250.0])
def test_sigma_rel_is_the_relative_std_of_the_power_density_and_gamma_its_inverse(gamma):
    """Eq. 123 against quadrature of the density p(tau) = (gamma + 1) tau^gamma on [0, 1]; Eq. 126 inverts it."""
    tau = np.linspace(0, 1, 400_001)
    p = (gamma + 1) * tau**gamma
    mean = np.trapezoid(tau * p, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert gamma_to_sigma_rel(gamma) == pytest.approx(std, rel=1e-5)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)


def test_edm2s_sigma_rels_map_to_the_papers_exponents():
    """EDM2 tracks sigma_rel 0.05 and 0.10, i.e. gamma = 16.97 and 6.94 (Sec. 3.1)."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (1e-3, 0.01, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.12])
def test_power_ema_is_the_closed_form_weighted_average_of_the_trajectory(sigma_rel):
    """The tracked EMA of a sequence of scalar "weights" theta_1..theta_t equals sum_tau w_tau theta_tau
    with w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), at every step t."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(300, generator=g, dtype=f64).cumsum(0)
    net = torch.nn.Linear(1, 1, bias=False).to(f64)
    power = PowerEMA(net, [sigma_rel])
    gamma = power.gammas[0]
    for t in range(1, len(theta) + 1):
        net.weight.data.fill_(theta[t - 1])
        power.update(net, t)
        if t in (1, 2, 17, 300):
            w = power_weights(gamma, t)
            assert w.sum().item() == pytest.approx(1.0, abs=1e-12) and (w > 0).all()
            expected = (w * theta[:t]).sum()
            torch.testing.assert_close(power.emas[0].weight[0, 0], expected, rtol=1e-12, atol=1e-12)
    # its relative width over a long run is sigma_rel (the discrete weights sample the density)
    w = power_weights(gamma, 100_000)
    tau = torch.arange(1, 100_001, dtype=f64) - 0.5
    mean = (w * tau).sum()
    assert math.sqrt((w * (tau - mean) ** 2).sum()) / 100_000 == pytest.approx(sigma_rel, rel=1e-4)


def test_profile_inner_products_match_quadrature():
    """Eq. 151 against the integral of the product of two power densities on [0, min(t_a, t_b)]."""
    for t_a, s_a, t_b, s_b in [(400, 0.05, 1000, 0.1), (1000, 0.05, 700, 0.2), (500, 0.1, 500, 0.1)]:
        g_a, g_b = sigma_rel_to_gamma(s_a), sigma_rel_to_gamma(s_b)
        tau = np.linspace(0, min(t_a, t_b), 1_000_001)  # both densities vanish past the shorter profile
        p_a, p_b = (g_a + 1) * tau**g_a / t_a ** (g_a + 1), (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
        exact = profile_inner_products(np.float64(t_a), np.float64(g_a), np.float64(t_b), np.float64(g_b))
        assert exact == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-7)


def _track(trajectory: torch.Tensor, sigma_rels: list[float], every: int) -> tuple[list[Snapshot], PowerEMA]:
    """Power EMAs of a (T, P) parameter trajectory, with snapshots every ``every`` steps."""
    net = torch.nn.Linear(trajectory.shape[1], 1, bias=False).to(f64)
    power, snapshots = PowerEMA(net, sigma_rels), []
    for t in range(1, len(trajectory) + 1):
        net.weight.data.copy_(trajectory[t - 1][None])
        power.update(net, t)
        if t % every == 0:
            for s, ema in zip(power.sigma_rels, power.emas, strict=True):
                snapshots.append(Snapshot(t, s, {k: v.clone() for k, v in ema.state_dict().items()}))
    return snapshots, power


def _trajectory(T: int = 1000, seed: int = 0) -> torch.Tensor:
    """A vector parameter drifting as under SGD: a slow oscillation, a random walk, per-step noise."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.arange(1, T + 1, dtype=f64)
    walk = torch.cumsum(0.05 * torch.randn(T, generator=g, dtype=f64), 0)
    return torch.stack(
        [torch.sin(tau / 150) + 0.3 * torch.randn(T, generator=g, dtype=f64), 1 / tau.sqrt() + walk, 0.01 * tau], 1
    )


def test_reconstruction_matches_the_same_profile_tracked_directly():
    """Snapshots of sigma_rel 0.05 and 0.10 every 20 of 1000 steps reconstruct a sigma_rel 0.075 EMA
    (never tracked) to within 1e-5 of that EMA tracked step by step; the two tracked profiles differ
    from it by ~0.1, so this is the least-squares fit doing its work, not the profiles being alike."""
    trajectory = _trajectory()
    snapshots, _ = _track(trajectory, [0.05, 0.10], every=20)
    _, direct = _track(trajectory, [0.075], every=10**9)
    rebuilt = reconstruct(snapshots, 0.075)["weight"]
    assert (rebuilt - direct.emas[0].weight).abs().max() < 1e-5
    last = {s.sigma_rel: s.weights["weight"] for s in snapshots if s.step == 1000}
    assert min((last[s] - direct.emas[0].weight).abs().max() for s in last) > 0.05

    # at an earlier step, from the 25 snapshot times up to it (half as many: a coarser fit)
    _, direct_500 = _track(trajectory[:500], [0.075], every=10**9)
    assert (reconstruct(snapshots, 0.075, step=500)["weight"] - direct_500.emas[0].weight).abs().max() < 1e-4

    # a tracked profile at a snapshot's step is that snapshot exactly
    own = reconstruct(snapshots, 0.10)["weight"]
    torch.testing.assert_close(own, last[0.10], rtol=0, atol=1e-12)


def test_reconstructed_weights_per_step_fit_the_target_profile():
    """Trajectory-free: the combined discrete weights sum_i x_i w_i(tau) against the target's w(tau)."""
    T, every = 1000, 20
    steps = [t for t in range(every, T + 1, every) for _ in (0, 1)]
    widths = [0.05, 0.10] * (len(steps) // 2)
    x = solve_coefficients(steps, widths, T, 0.075)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)
    combined = torch.zeros(T, dtype=f64)
    for coef, t, s in zip(x, steps, widths, strict=True):
        combined[:t] += float(coef) * power_weights(sigma_rel_to_gamma(s), t)
    target = power_weights(sigma_rel_to_gamma(0.075), T)
    assert (combined - target).abs().sum() < 2e-3  # total variation; each profile has mass 1


def test_reconstruct_refuses_bad_input():
    snaps = [Snapshot(10, 0.05, {"w": torch.ones(2)})]
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            reconstruct(snaps, bad)
    with pytest.raises(ValueError, match="at least one snapshot"):
        reconstruct([], 0.1)
    with pytest.raises(ValueError, match="no snapshot at or before step 5"):
        reconstruct(snaps, 0.1, step=5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"posthoc_ema": [0.3]}, "must lie in"),
        ({"posthoc_ema": [0.0]}, "must lie in"),
        ({"posthoc_ema": [0.05, 0.05]}, "twice"),
        ({"posthoc_ema": 0.05}, "a list of finite numbers"),
        ({"posthoc_snapshot_every": 10}, "applies with posthoc_ema"),
        ({"posthoc_ema": [0.1], "posthoc_snapshot_every": 0}, ">= 1"),
    ],
)
def test_bad_posthoc_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig.from_dict(settings)
    assert "\n" not in str(e.value)


def test_config_records_the_applied_snapshot_interval():
    assert TrainConfig.from_dict({"posthoc_ema": [0.05, 0.1], "steps": 400}).posthoc_snapshot_every == 20
    off = TrainConfig.from_dict({})
    assert off.posthoc_ema == [] and off.posthoc_snapshot_every is None


# ---- end to end: a tiny toy run with snapshots, sampled with --ema-profile ------------------------

TOY = ["train", "toy", "--model", "tiny", "--steps", "12", "--save-every", "6"]


def _cli(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phema")
    (root / "phema.json").write_text(json.dumps({"posthoc_ema": [0.05, 0.1], "posthoc_snapshot_every": 3}))
    assert _cli([*TOY, "--config", root / "phema.json", "--out", root / "run"]) == 0
    assert _cli([*TOY, "--out", root / "plain"]) == 0
    return root


def test_training_saves_snapshots_that_keep_does_not_prune(run):
    config = json.loads((run / "run" / "config.json").read_text())["train"]
    assert config["posthoc_ema"] == [0.05, 0.1] and config["posthoc_snapshot_every"] == 3
    steps = sorted(p.name for p in (run / "run" / "checkpoints").glob("step_*"))
    assert steps == [f"step_{t:08d}" for t in (3, 6, 9, 12)]  # all snapshots, though keep is 3
    snapshots = find_snapshots(run / "run")
    assert [(s.step, s.sigma_rel) for s in snapshots] == [(t, s) for t in (3, 6, 9, 12) for s in (0.05, 0.1)]
    for step in (run / "run" / "checkpoints").glob("step_*"):
        integrity.verify(step)  # the snapshot files are in the manifest
        digests = json.loads((step / "manifest.json").read_text())["sha256"]
        assert {"snapshot.json", "power_ema_0.safetensors", "power_ema_1.safetensors"} <= digests.keys()
    assert find_snapshots(run / "plain") == []


def test_sample_with_an_ema_profile(run, tmp_path, capsys):
    from unnoise.modalities.run import load_run

    assert (
        _cli(["sample", "--run", run / "run", "--ema-profile", 0.07, "--n", 8, "--nfe", 4, "--out", tmp_path / "s"])
        == 0
    )
    assert (tmp_path / "s.png").is_file() and "post-hoc EMA sigma_rel 0.07 at step 12" in capsys.readouterr().out
    # a tracked width at the last snapshot loads that snapshot's weights exactly
    loaded = load_run(run / "run", ema_profile=0.1).model.state_dict()
    stored = load_file(run / "run" / "checkpoints" / "step_00000012" / "power_ema_1.safetensors")
    for key, value in stored.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "plain", "--ema-profile", "0.1"], "no post-hoc EMA snapshots"),
        (["--run", "run", "--ema-profile", "0.4"], "must lie in"),
        (["--run", "run", "--ema-profile", "nan"], "must lie in"),
    ],
)
def test_bad_ema_profiles_are_refused_in_one_line(run, tmp_path, capsys, argv, message):
    argv = [a if a not in ("plain", "run") else run / a for a in argv]
    assert _cli(["sample", *argv, "--n", 4, "--out", tmp_path / "s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s.png").exists()


def test_resuming_with_other_power_emas_is_refused(run, tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"posthoc_ema": [0.2]}))
    argv = ["train", "toy", "--model", "tiny", "--steps", "15", "--save-every", "6", "--resume"]
    assert _cli([*argv, "--config", tmp_path / "other.json", "--out", run / "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "posthoc_ema must stay as the run began" in err[0]


def test_a_resumed_run_tracks_the_same_power_emas(run, tmp_path):
    """Stopped at step 6 and resumed, the run's power EMAs at step 12 equal the uninterrupted run's."""
    config = run / "phema.json"
    assert _cli(["train", "toy", "--model", "tiny", "--steps", "6", "--config", config, "--out", tmp_path / "r"]) == 0
    assert _cli([*TOY, "--config", config, "--resume", "--out", tmp_path / "r"]) == 0
    for name in ("power_ema_0", "power_ema_1"):
        resumed = load_file(tmp_path / "r" / "checkpoints" / "step_00000012" / f"{name}.safetensors")
        straight = load_file(run / "run" / "checkpoints" / "step_00000012" / f"{name}.safetensors")
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
