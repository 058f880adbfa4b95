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
