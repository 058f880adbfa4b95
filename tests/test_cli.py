import subprocess
import sys

import pytest
import torch

from unnoise.cli.main import main
from unnoise.modalities.toy.demo import DemoConfig, run_demo


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "unnoise", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--steps", "x"], ["fly"], []])
def test_bad_arguments_give_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_value_errors_become_one_line(monkeypatch, capsys, tmp_path):
    import unnoise.modalities.toy.modality

    def boom(cfg):
        raise ValueError("something is wrong; allowed: this")

    # the name the toy modality calls (patching only toy.demo misses it once modality.py is imported),
    # and an --out in tmp_path: were the patch to miss, the real demo would not write into the cwd
    monkeypatch.setattr(unnoise.modalities.toy.modality, "run_demo", boom)
    assert main(["demo", "toy", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == "unnoise demo: error: something is wrong; allowed: this\n"


def test_small_demo_writes_its_picture_and_figures(tmp_path):
    cfg = DemoConfig(steps=60, batch_size=256, T=100, n_test=200, n_samples=200, out=tmp_path)
    figures = run_demo(cfg)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert figures["elbo_bpd"] > figures["true_nll_bpd"] - 3 * figures["elbo_stderr"]


@pytest.mark.slow
def test_image_demo_writes_samples_trajectory_and_bits_per_dim(tmp_path, capsys):
    """`unnoise demo` (images), shortened: its files and its printed figure."""
    from unnoise.modalities.image.demo import run_image_demo

    figures = run_image_demo(tmp_path, steps=20)
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "trajectory.png").is_file()
    assert 0 < figures["bpd"] < 8 and figures["bpd_stderr"] > 0 and 0 <= figures["class_accuracy"] <= 1
    out = capsys.readouterr().out
    assert "bits/dim" in out and "class accuracy of 500 guided samples" in out and "demo done in" in out


@pytest.mark.slow
def test_full_demo_fits_the_mixture(tmp_path):
    """The README's main job: the bound lands within 0.25 bits/dim of the true NLL."""
    figures = run_demo(DemoConfig(out=tmp_path))
    assert figures["elbo_bpd"] - figures["true_nll_bpd"] < 0.25


# ---- autoguidance: unnoise sample --run RUN --autoguide BAD_RUN --autoguidance W ---------------------

IMAGE = ["train", "image", "--data", "digits", "--model", "tiny", "--batch-size", "8"]


def _cli(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        return int(e.code)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """Two tiny class-conditional digit runs (the "bad" one trained less), an unconditional one, a toy run."""
    root = tmp_path_factory.mktemp("autoguide")
    assert _cli([*IMAGE, "--steps", "3", "--out", root / "good"]) == 0
    assert _cli([*IMAGE, "--steps", "1", "--out", root / "bad"]) == 0
    assert _cli([*IMAGE, "--steps", "1", "--unconditional", "--out", root / "uncond"]) == 0
    assert _cli(["train", "toy", "--model", "tiny", "--steps", "2", "--out", root / "toy"]) == 0
    return root


def test_autoguided_run_denoiser_is_the_combinator_on_both_classifier_free_guided_models(image_runs):
    """Run.autoguided: D = CFG_bad + w (CFG_good - CFG_bad), both at the same labels and CFG scale."""
    from unnoise.guidance import autoguidance
    from unnoise.modalities.image.pipeline import null_label
    from unnoise.modalities.run import load_run

    good, bad = load_run(image_runs / "good"), load_run(image_runs / "bad")
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0, 20.0]), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        guided = good.autoguided(bad, 2.5).denoiser(labels, null_label(good), 1.5)(x, sigma)
        expected = autoguidance(
            good.denoiser(labels, null_label(good), 1.5), bad.denoiser(labels, null_label(bad), 1.5), 2.5
        )(x, sigma)
        plain = good.denoiser(labels, null_label(good), 1.5)(x, sigma)
    torch.testing.assert_close(guided, expected, rtol=0, atol=0)
    assert (guided - plain).abs().max() > 1e-3  # the bad model is not ignored


def test_sample_with_autoguide_and_guidance_is_the_python_apis_draw(image_runs, tmp_path):
    import numpy as np

    from unnoise.modalities.image.pipeline import sample_images
    from unnoise.modalities.run import load_run

    good, bad = image_runs / "good", image_runs / "bad"
    flags = ["--autoguidance", 2, "--guidance", 2, "--class", 3, "--n", 4, "--nfe", 4, "--sampler", "euler"]
    assert _cli(["sample", "--run", good, "--autoguide", bad, *flags, "--out", tmp_path / "ag"]) == 0
    run = load_run(image_runs / "good").autoguided(load_run(image_runs / "bad"), 2.0)
    images, _ = sample_images(run, n=4, nfe=4, sampler="euler", class_id=3, guidance=2.0)
    cli = np.load(tmp_path / "ag.npz")["images"]
    np.testing.assert_array_equal(cli, images.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "good", "--autoguidance", "2"], "--autoguidance scales --autoguide"),
        (["--run", "good", "--autoguide", "nowhere"], "no run folder there"),
        (["--run", "good", "--autoguide", "toy"], "is a run of modality toy; this run is of image"),
        (["--run", "good", "--autoguide", "uncond"], "conditional"),
        (["--run", "good", "--autoguide", "bad", "--autoguidance", "-1"], "expected a number >= 0"),
        (["--diffusers", "good", "--autoguide", "bad"], "not --autoguide"),
    ],
)
def test_bad_autoguide_requests_are_refused_in_one_line(image_runs, tmp_path, capsys, argv, message):
    named = {"good", "bad", "toy", "uncond", "nowhere"}
    argv = [image_runs / a if a in named else a for a in argv]
    assert _cli(["sample", *argv, "--n", 4, "--out", tmp_path / "s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.png").exists()


def test_text_runs_are_not_autoguided():
    from torch import nn

    from unnoise.modalities.base import get_modality
    from unnoise.modalities.run import Run
    from unnoise.training.config import TrainConfig

    text = Run(get_modality("text"), TrainConfig(), nn.Linear(1, 1))
    with pytest.raises(ValueError, match="word embeddings it learned itself"):
        text.autoguided(text, 2.0)
