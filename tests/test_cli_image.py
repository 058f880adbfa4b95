"""The image CLI end to end on a tiny model: train, sample, eval, and one-line errors."""

import json

import numpy as np
import pytest
from conftest import one_line_exit_2
from PIL import Image

from unnoise.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    settings = root / "settings.json"
    settings.write_text(json.dumps({"T": 100, "log_every": 2}))
    args = ["train", "image", "--data", "digits", "--model", "tiny", "--steps", "4", "--batch-size", "16"]
    assert main([*args, "--config", str(settings), "--out", str(root / "run")]) == 0
    return root / "run"


def test_sample_writes_grid_npz_and_trajectory(run, tmp_path):
    out, traj = tmp_path / "s", tmp_path / "traj.png"
    args = ["sample", "--run", str(run), "--nfe", "4", "--n", "20", "--guidance", "2", "--out", str(out)]
    assert main([*args, "--trajectory", str(traj)]) == 0
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (20, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [i // 2 for i in range(20)]  # two per class, in order
    assert Image.open(tmp_path / "s.png").size[0] > 8 * 10 and Image.open(traj).size[0] > 0


def test_class_and_eta(run, tmp_path):
    args = ["sample", "--run", str(run), "--nfe", "3", "--n", "4", "--class", "7", "--sampler", "ddim"]
    assert main([*args, "--eta", "1", "--out", str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [7] * 4


def test_eval_bpd(run, capsys):
    assert main(["eval", "--run", str(run), "--bpd", "--n", "8"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    one_line_exit_2(main, ["eval", "--run", str(run)], capsys, "say what to evaluate; allowed: --bpd")


def _one_line_exit_2(argv, capsys, match):
    one_line_exit_2(main, argv, capsys, match)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--class", "12"], "unknown class 12; allowed: 0..9"),
        (["--sampler", "plms"], "unknown sampler 'plms'"),
        (["--sampler", "euler", "--eta", "0.5"], "--eta applies to ddim"),
    ],
)
def test_bad_sampling_input(run, tmp_path, capsys, extra, match):
    _one_line_exit_2(["sample", "--run", str(run), "--nfe", "2", "--out", str(tmp_path / "s"), *extra], capsys, match)


def test_missing_run_folder(tmp_path, capsys):
    _one_line_exit_2(["sample", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "s")], capsys, "no run folder")


def test_tampered_checkpoint(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = next((copy / "checkpoints").glob("step_*"))
    weights = step / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    _one_line_exit_2(["sample", "--run", str(copy), "--out", str(tmp_path / "s")], capsys, "ema.safetensors")


def test_pickled_checkpoint_is_refused(run, tmp_path, capsys):
    import shutil

    import torch

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = next((copy / "checkpoints").glob("step_*"))
    torch.save({"x": torch.zeros(1)}, step / "ema.safetensors")
    _one_line_exit_2(["sample", "--run", str(copy), "--out", str(tmp_path / "s")], capsys, "pickle")


def test_guidance_on_an_unconditional_model(tmp_path, capsys):
    args = ["train", "image", "--data", "digits", "--model", "tiny", "--steps", "1", "--batch-size", "8"]
    assert main([*args, "--unconditional", "--out", str(tmp_path / "u")]) == 0
    capsys.readouterr()
    sample = ["sample", "--run", str(tmp_path / "u"), "--out", str(tmp_path / "s")]
    _one_line_exit_2([*sample, "--class", "3"], capsys, "unconditional")
    _one_line_exit_2([*sample, "--guidance", "3"], capsys, "guidance needs a class-conditional run")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "image", "--data", "mnist", "--out", "x"], "mnist"),
        (["train", "image", "--model", "huge", "--steps", "1", "--out", "x"], "unknown U-Net preset 'huge'"),
        (["eval", "--run", "x"], "no run folder at x"),
    ],
)
def test_bad_train_and_eval_input(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(argv, capsys, match)
