"""A new modality is one module and one registry line: train, sample and eval through the CLI unchanged."""

import json

import pytest
from conftest import one_line_exit_2

from unnoise.cli import main
from unnoise.modalities import base


@pytest.fixture
def gauss(monkeypatch):
    monkeypatch.setitem(base.REGISTRY, "gauss", "fake_modality")  # tests/fake_modality.py


@pytest.mark.parametrize("objective", ["ddpm", "edm"])
def test_a_registered_modality_trains_samples_and_evaluates(gauss, tmp_path, capsys, objective):
    run = tmp_path / "run"
    assert main(["train", "gauss", "--steps", "40", "--objective", objective, "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["extra"]["modality"] == "gauss" and saved["objective"] == objective
    assert main(["sample", "--run", str(run), "--n", "5", "--nfe", "8", "--out", str(tmp_path / "x")]) == 0
    rows = (tmp_path / "x.txt").read_text().splitlines()
    assert len(rows) == 5 and all(len(r.split()) == 4 for r in rows)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--n", "64", "--nfe", "8"]) == 0
    assert "sample mean" in capsys.readouterr().out


def test_a_registered_modality_refuses_in_one_line(gauss, tmp_path, capsys):
    one_line_exit_2(main, ["train", "gauss", "--loss", "hybrid", "--out", str(tmp_path / "r")], capsys, "variance")
    assert main(["train", "gauss", "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    argv = ["sample", "--run", str(tmp_path / "run"), "--class", "1", "--out", str(tmp_path / "x")]
    capsys.readouterr()
    one_line_exit_2(main, argv, capsys, "gauss runs take --grid (sample); not --class")


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_run_samples_in_bf16_only_where_the_machine_has_it(gauss, tmp_path, monkeypatch, native):
    """Emulated bf16 (an AVX2-only CPU) is tens of times slower than float32: sampling stays float32 there."""
    import torch

    from unnoise.modalities import run as run_module

    assert main(["train", "gauss", "--steps", "2", "--bf16", "--out", str(tmp_path / "run")]) == 0
    monkeypatch.setattr(run_module, "native_bf16", lambda: native)
    run = run_module.load_run(tmp_path / "run")
    seen, network = [], run.modality.network

    def spy(model):
        return lambda x, t, cond: seen.append(torch.is_autocast_enabled("cpu")) or network(model)(x, t, cond)

    monkeypatch.setattr(run.modality, "network", spy)
    run.denoiser(None, None)(torch.zeros(1, 4), torch.tensor(1.0))
    assert seen == [native]
    seen.clear()
    run.denoiser(None, None, bf16=True)(torch.zeros(1, 4), torch.tensor(1.0))  # asked for: always
    assert seen == [True]


@pytest.mark.parametrize("objective", ["ddpm", "edm"])
def test_a_run_records_its_data_scale_and_centres_the_sampling_grid_on_it(gauss, tmp_path, objective):
    """config.json records the encoded data's std; the run's denoisers carry it as ``sigma_data``,
    which unnoise.sample's tuned grid is centred on (EDM's sigma_data defaults to the same)."""
    import torch

    from unnoise.modalities.run import load_run
    from unnoise.sampling.front import data_scale

    assert main(["train", "gauss", "--steps", "2", "--objective", objective, "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    run = load_run(tmp_path / "run")
    data = run.modality.training_data(run.cfg)
    expected = run.modality.encode(run.model, data.x[:4096]).x0.double().std().item()
    assert saved["extra"]["data_std"] == pytest.approx(expected, rel=1e-5)
    if objective == "edm":
        assert saved["sigma_data"] == saved["extra"]["data_std"]
    D = run.denoiser(None, None)
    assert data_scale(D) == pytest.approx(expected, rel=1e-5)
    del run.cfg.extra["data_std"]  # a run from before the scale was recorded: EDM's sigma_data, else the default
    assert data_scale(run.denoiser(None, None)) == (saved["sigma_data"] if objective == "edm" else 1.0)
    assert torch.isfinite(D(torch.zeros(2, 4), torch.tensor(1.0))).all()
