"""The text2image modality end to end through the CLI: train vae -> train text2image -> sample -> eval.

Tiny models, a few hundred scenes and a few steps: these check the plumbing (what is written, what is
recorded, what is refused), not image quality (benchmarks/text2image.py measures that).
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from unnoise.cli.main import main
from unnoise.modalities.base import REGISTRY, get_modality

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VAE run and a tiny text2image run on it (300 scenes, 12 steps each)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t2i")
    (root / "small.json").write_text(json.dumps({"extra": {"scenes": 300}, "save_every": 6}))
    common = ["--model", "tiny", "--steps", "12", "--batch-size", "16", "--config", str(root / "small.json")]
    assert main(["train", "vae", *common, "--out", str(root / "vae")]) == 0
    assert main(["train", "text2image", *common, "--vae", str(root / "vae"), "--out", str(root / "run")]) == 0
    torch.set_num_threads(n)
    return root


def test_text2image_is_registered_with_the_protocol():
    assert REGISTRY["text2image"] == "unnoise.modalities.text2image.modality"
    m = get_modality("text2image")
    assert m.name == "text2image" and m.defaults["data"] == "fashion-scenes"
    assert {"prompt", "prompts", "negative_prompt", "guidance"} <= set(m.sample_options)
    for method in ("check", "training_data", "build", "load", "network", "encode", "sample", "write", "evaluate"):
        assert callable(getattr(m, method))


@pytest.mark.slow
def test_the_vae_run_records_its_scale_factor_and_the_text2image_run_its_vae(runs, capsys):
    vae = json.loads((runs / "vae" / "config.json").read_text())["train"]["extra"]
    assert vae["modality"] == "vae" and vae["latent_scale_factor"] > 0 and vae["vae"]["z_channels"] == 2
    extra = json.loads((runs / "run" / "config.json").read_text())["train"]["extra"]
    assert extra["modality"] == "text2image" and extra["latent_scale_factor"] == vae["latent_scale_factor"]
    ema = sorted((runs / "vae" / "checkpoints").glob("step_*"))[-1] / "ema.safetensors"
    assert extra["vae_sha256"] == hashlib.sha256(ema.read_bytes()).hexdigest()
    assert extra["vae_config"] == vae["vae"] and extra["vae_run"] == str((runs / "vae").resolve())
    assert "bag" in extra["vocabulary"] and extra["vocabulary"][:3] == ["<pad>", "<unk>", "<null>"]
    # the run carries the VAE's weights: they equal the VAE run's EMA, untouched by training
    from unnoise.modalities.run import load_run
    from unnoise.modalities.text2image.vae_run import load_vae_run

    run, vae_run = load_run(runs / "run"), load_vae_run(runs / "vae")
    for name, weight in vae_run.vae.state_dict().items():
        torch.testing.assert_close(run.codec.vae.state_dict()[name], weight, rtol=0, atol=0)
    assert run.latent_shape == (2, 28, 28) and run.codec.scale_factor == vae_run.scale_factor


@pytest.mark.slow
def test_sample_writes_a_grid_and_an_npz_of_images_and_prompts(runs, capsys):
    out = runs / "one.png"
    argv = ["sample", "--run", str(runs / "run"), "--prompt", "a bag in the top left", "--nfe", "4", "--n", "3"]
    assert main([*argv, "--negative-prompt", "a bag in the bottom right", "--guidance", "4", "--out", str(out)]) == 0
    data = np.load(runs / "one.npz")
    assert data["images"].shape == (3, 56, 56, 1) and data["images"].dtype == np.uint8
    assert list(data["prompts"]) == ["a bag in the top left"] * 3
    assert out.stat().st_size > 500
    # per-sample seeds make image i independent of n
    assert main([*argv[:-2], "--n", "1", "--guidance", "4", "--out", str(runs / "plain")]) == 0
    plain = np.load(runs / "plain.npz")["images"]
    assert main([*argv[:-2], "--n", "2", "--guidance", "4", "--out", str(runs / "plain2")]) == 0
    assert np.array_equal(np.load(runs / "plain2.npz")["images"][:1], plain)


@pytest.mark.slow
def test_the_negative_prompt_takes_the_null_prompts_place(runs):
    """12 steps leave the U-Net's zero-initialised output near zero, so the prompt barely matters yet:
    perturb the weights, then the negative prompt must change the samples (and None is the null prompt)."""
    from unnoise.modalities.run import load_run
    from unnoise.modalities.text2image.pipeline import sample_text2image

    run = load_run(runs / "run")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in run.model.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    kw = dict(n=2, guidance=4.0, nfe=3, sampler="euler")
    plain, _ = sample_text2image(run, ["a bag in the top left"], **kw)
    negative, _ = sample_text2image(run, ["a bag in the top left"], negative_prompt="a bag in the bottom right", **kw)
    assert not torch.equal(plain, negative)
    again, _ = sample_text2image(run, ["a bag in the top left"], **kw)
    assert torch.equal(plain, again)


@pytest.mark.slow
def test_prompts_file_cycles_its_prompts(runs, capsys):
    prompts = ["a bag in the top left", "top-left: coat; bottom-right: shirt", "an ankle boot at the upper right"]
    (runs / "prompts.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    argv = ["sample", "--run", str(runs / "run"), "--prompts", str(runs / "prompts.txt"), "--nfe", "3", "--n", "5"]
    assert main([*argv, "--out", str(runs / "many")]) == 0
    data = np.load(runs / "many.npz")
    assert list(data["prompts"]) == [*prompts, *prompts[:2]] and len(data["images"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "empty prompt"),
        ("   ", "empty prompt"),
        ("\udcff bag", "not UTF-8"),  # how sys.argv carries an undecodable byte
        (" ".join(["a bag in the top left and"] * 9), "at most 48"),
        ("a purple bag in the top left", "never saw: purple"),
    ],
)
def test_a_bad_prompt_is_one_line_and_exit_2(runs, prompt, message, capsys):
    argv = ["sample", "--run", str(runs / "run"), "--prompt", prompt, "--n", "1", "--out", str(runs / "bad")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unnoise sample: error:") and message in err and err.count("\n") == 1
    assert not (runs / "bad.png").exists()


@pytest.mark.slow
def test_bad_prompt_files_and_flag_mixes_are_refused(runs, capsys):
    (runs / "latin1.txt").write_bytes(b"a bag in the top left\n\xe9\n")
    run = ["sample", "--run", str(runs / "run"), "--n", "1", "--out", str(runs / "bad")]
    cases = [
        (["--prompts", str(runs / "latin1.txt")], "not UTF-8"),
        (["--prompts", str(runs / "nothing.txt")], "no such file"),
        (["--prompt", "a bag in the top left", "--prompts", str(runs / "latin1.txt")], "not both"),
        ([], "needs --prompt"),
        (["--prompt", "a bag in the top left", "--negative-prompt", "a coat in the top left"], "--guidance"),
        (["--prompt", "a bag in the top left", "--class", "1"], "not --class"),
    ]
    for extra, message in cases:
        assert main([*run, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)


@pytest.mark.slow
def test_train_refuses_a_missing_or_wrong_vae_in_one_line(runs, tmp_path, capsys):
    cases = [
        (["train", "text2image", "--out", str(tmp_path / "a")], "give --vae RUN"),
        (["train", "text2image", "--vae", str(tmp_path / "none"), "--out", str(tmp_path / "b")], "no run there"),
        (["train", "text2image", "--vae", str(runs / "run"), "--out", str(tmp_path / "c")], "not a VAE run"),
        (["train", "image", "--vae", str(runs / "vae"), "--out", str(tmp_path / "d")], "image runs take none"),
        (["train", "vae", "--objective", "edm", "--out", str(tmp_path / "e")], "--objective does not apply"),
        (["sample", "--run", str(runs / "vae"), "--out", str(tmp_path / "f")], "is a VAE run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_eval_reports_vae_reconstruction_and_prompt_following(runs, monkeypatch, capsys):
    assert main(["eval", "--run", str(runs / "vae"), "--n", "20"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction PSNR" in out and "20 test-split fashion-scenes" in out and "nats per pixel" in out
    assert main(["eval", "--run", str(runs / "vae"), "--guidance", "2"]) == 2
    assert "vae runs take --n" in capsys.readouterr().err

    import unnoise.modalities.text2image.metrics as metrics

    monkeypatch.setattr(metrics, "RECIPE", metrics.RECIPE | {"steps": 20})  # a quick, poor classifier
    monkeypatch.setattr(metrics, "default_cache", lambda: runs / "cache")
    argv = ["eval", "--run", str(runs / "run"), "--n", "8", "--nfe", "3", "--guidance", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prompt following (generated)" in out and "prompt following (real scenes, same prompts)" in out
    assert "8 test prompts" in out and "s per image" in out
    meta = json.loads((runs / "cache" / "cell-classifier" / "meta.json").read_text())
    assert meta["train"]["steps"] == 20  # cached, with its recipe
    assert main(argv) == 0  # the second eval loads the cached classifier
    assert capsys.readouterr().out.splitlines()[1:3] == out.splitlines()[1:3]


@pytest.mark.slow
def test_a_run_samples_without_its_vae_run(runs, tmp_path, capsys):
    shutil.copytree(runs / "run", tmp_path / "run")
    shutil.copytree(runs / "vae", tmp_path / "vae")
    argv = ["sample", "--run", str(tmp_path / "run"), "--prompt", "a bag in the top left", "--nfe", "3", "--n", "2"]
    assert main([*argv, "--out", str(tmp_path / "before")]) == 0
    shutil.rmtree(tmp_path / "vae")
    assert main([*argv, "--out", str(tmp_path / "after")]) == 0
    before, after = np.load(tmp_path / "before.npz")["images"], np.load(tmp_path / "after.npz")["images"]
    assert np.array_equal(before, after)


@pytest.mark.slow
def test_a_captioned_folder_trains_a_vae_and_a_text2image_run(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    rows = []
    for i in range(8):
        pixels = np.zeros((40, 40), dtype=np.uint8)
        pixels[: 20 if i % 2 else 40, :20] = 255
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a white square" if i % 2 else "a white bar"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--data", str(folder), "--model", "tiny", "--steps", "2", "--batch-size", "4"]
    assert main(["train", "vae", *common, "--image-size", "24", "--out", str(tmp_path / "vae")]) == 0
    assert main(["train", "text2image", *common, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "run")]) == 0
    extra = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["extra"]
    assert extra["vocabulary"][3:] == ["a", "bar", "square", "white"]
    argv = ["sample", "--run", str(tmp_path / "run"), "--prompt", "a white bar", "--n", "2", "--nfe", "2"]
    assert main([*argv, "--out", str(tmp_path / "bars")]) == 0
    assert np.load(tmp_path / "bars.npz")["images"].shape == (2, 24, 24, 1)
    assert main(["eval", "--run", str(tmp_path / "run")]) == 2  # prompt following needs fashion-scenes prompts
    assert "fashion-scenes" in capsys.readouterr().err


@pytest.mark.slow
def test_a_pixel_space_run_diffuses_pixels_with_the_same_conditioning(tmp_path, capsys):
    config = tmp_path / "pixel.json"
    config.write_text(json.dumps({"extra": {"scenes": 200, "space": "pixel"}, "save_every": 2}))
    common = ["--model", "tiny", "--steps", "2", "--batch-size", "4", "--config", str(config)]
    assert main(["train", "text2image", *common, "--out", str(tmp_path / "run")]) == 0
    extra = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["extra"]
    assert extra["space"] == "pixel" and "vae_run" not in extra and "latent_scale_factor" not in extra
    # the same U-Net family down to the same 7x7 attention as on 14x14 latents: (1, 2, 2, 2) from 56x56
    assert extra["unet_config"]["image_size"] == 56 and extra["unet_config"]["in_channels"] == 1
    assert extra["unet_config"]["attention_resolutions"] == [7] and extra["unet_config"]["context_dim"] == 32
    argv = ["sample", "--run", str(tmp_path / "run"), "--prompt", "a bag in the top left", "--nfe", "2", "--n", "2"]
    assert main([*argv, "--guidance", "2", "--out", str(tmp_path / "s")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (2, 56, 56, 1) and images.dtype == np.uint8
    assert main(["train", "text2image", *common, "--vae", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "takes no --vae" in capsys.readouterr().err


def test_the_unet_halves_to_at_most_8_wide():
    from unnoise.modalities.text2image.modality import channel_mults

    assert channel_mults(14) == (1, 2) and channel_mults(56) == (1, 2, 2, 2) and channel_mults(28) == (1, 2, 2)
    assert channel_mults(8) == (1,) and channel_mults(32) == (1, 2, 2) and channel_mults(12) == (1, 2)
