import subprocess
import sys

import pytest

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


def test_value_errors_become_one_line(monkeypatch, capsys):
    import unnoise.modalities.toy.demo

    def boom(cfg):
        raise ValueError("something is wrong; allowed: this")

    monkeypatch.setattr(unnoise.modalities.toy.demo, "run_demo", boom)
    assert main(["demo", "toy"]) == 2
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
    assert 0 < figures["bpd"] < 8 and figures["bpd_stderr"] > 0
    assert "bits/dim" in capsys.readouterr().out


@pytest.mark.slow
def test_full_demo_fits_the_mixture(tmp_path):
    """The README's main job: the bound lands within 0.25 bits/dim of the true NLL."""
    figures = run_demo(DemoConfig(out=tmp_path))
    assert figures["elbo_bpd"] - figures["true_nll_bpd"] < 0.25
