"""Audio end to end on a tiny waveform U-Net (and DiffWave): train on synthesised spoken digits, sample WAVs, errors."""

import json
import shutil

import pytest
import torch
from conftest import one_line_exit_2

from unnoise.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("audio")
    settings = root / "settings.json"
    settings.write_text(json.dumps({"T": 100, "log_every": 2, "extra": {"cache": str(root / "digits")}}))
    args = ["train", "audio", "--data", "spoken-digits", "--model", "tiny", "--steps", "3", "--batch-size", "8"]
    assert main([*args, "--config", str(settings), "--out", str(root / "run")]) == 0
    return root / "run"


def test_sample_writes_wavs_and_spectrograms(run, tmp_path):
    from unnoise.modalities.audio.wav import read_wav

    argv = ["sample", "audio", "--run", str(run), "--n", "3", "--nfe", "3", "--guidance", "2", "--out"]
    assert main([*argv, str(tmp_path / "clips")]) == 0
    wavs = sorted(tmp_path.glob("clips_*.wav"))
    assert [w.name for w in wavs] == ["clips_000_class0.wav", "clips_001_class1.wav", "clips_002_class2.wav"]
    wave, rate = read_wav(wavs[0])
    assert rate == 8000 and wave.shape == (8000,)
    assert (tmp_path / "clips.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, match",
    [(["--class", "10"], "unknown class 10; allowed: 0..9"), (["--template", "x ___"], "audio runs take --class")],
)
def test_bad_audio_sampling_input(run, tmp_path, capsys, extra, match):
    one_line_exit_2(
        main, ["sample", "--run", str(run), "--nfe", "2", "--out", str(tmp_path / "s"), *extra], capsys, match
    )


def test_unknown_audio_data(tmp_path, capsys):
    assert main(["train", "audio", "--data", "birdsong", "--out", str(tmp_path / "r")]) == 2
    assert "allowed: spoken-digits" in capsys.readouterr().err


def test_diffwave_fast_sampling_from_the_cli(run, tmp_path):
    argv = ["sample", "--run", str(run), "--n", "2", "--sampler", "ddpm", "--nfe", "6", "--grid", "diffwave"]
    assert main([*argv, "--out", str(tmp_path / "fast")]) == 0
    assert len(list(tmp_path.glob("fast_*.wav"))) == 2


def test_eval_prints_accuracy_distance_and_real_time_factor(run, capsys, monkeypatch):
    """The plumbing, with an untrained judge (the trained one is tested in test_audio_metrics.py)."""
    import torch

    from unnoise.modalities.audio import classifier as audio_classifier

    torch.manual_seed(0)
    judge = audio_classifier.DigitClassifier(audio_classifier.DigitClassifierConfig.for_rate(8000)).eval()
    monkeypatch.setattr(audio_classifier, "digit_classifier", lambda *a, **k: judge)
    assert main(["eval", "--run", str(run), "--n", "10", "--nfe", "2"]) == 0
    out = capsys.readouterr().out
    assert "digit accuracy of class-conditional samples" in out and "10 clips, unipc, 2 NFE" in out
    assert "Frechet distance" in out and "real-time factor" in out
    one_line_exit_2(
        main, ["eval", "--run", str(run), "--bpd"], capsys, "audio runs take --n, --guidance, --grid (eval); not --bpd"
    )
    one_line_exit_2(main, ["eval", "--run", str(run), "--grid", "spiral"], capsys, "unknown grid 'spiral'")


@pytest.mark.slow
def test_audio_demo_writes_wavs_and_spectrograms(tmp_path, capsys):
    """`unnoise demo audio`, shortened to 2 steps: its files and its printed figures."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    assert main(["demo", "audio", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("digit_*.wav")) == [f"digit_{d}.wav" for d in range(10)]
    assert (tmp_path / "spectrograms.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "the digit classifier hears" in out and "real-time factor" in out


def test_bf16_sampling_is_close_to_float32(run):
    from unnoise.modalities.audio.pipeline import load_audio_run, sample_audio

    loaded = load_audio_run(run)
    exact, labels = sample_audio(loaded, n=2, nfe=3, guidance=2.0, bf16=False)
    fast, same = sample_audio(loaded, n=2, nfe=3, guidance=2.0, bf16=True)
    assert fast.dtype == exact.dtype and torch.equal(labels, same)
    assert (fast - exact).abs().max() < 0.05 * exact.abs().max()


def test_both_audio_networks_train_sample_and_reload(run, tmp_path):
    """The default network is the waveform U-Net; --arch diffwave trains a DiffWave: same trainer,
    checkpoints and samplers."""
    from unnoise.modalities.audio.pipeline import load_audio_run, sample_audio
    from unnoise.nets.unet import UNet
    from unnoise.nets.wavenet import DiffWave

    unet = load_audio_run(run).net
    assert isinstance(unet, UNet) and unet.config.dims == 1 and unet.config.num_classes == 10
    cache = json.loads((run / "config.json").read_text())["train"]["extra"]["cache"]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"T": 100, "extra": {"cache": cache}}))
    args = ["train", "audio", "--arch", "diffwave", "--model", "tiny", "--steps", "2", "--batch-size", "4"]
    assert main([*args, "--config", str(settings), "--out", str(tmp_path / "dw")]) == 0
    loaded = load_audio_run(tmp_path / "dw")
    assert isinstance(loaded.net, DiffWave) and loaded.net.config.num_classes == 10
    waves, labels = sample_audio(loaded, n=2, nfe=2, guidance=2.0)
    assert waves.shape == (2, 8000) and waves.isfinite().all() and labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "args, match",
    [
        (["audio", "--arch", "transformer"], "unknown audio network 'transformer'; allowed: diffwave, unet"),
        (["audio", "--model", "base"], "unknown waveform U-Net preset 'base'; allowed: tiny, small"),
        (["image", "--arch", "unet"], "--arch chooses the audio network; image runs have one network each"),
    ],
)
def test_bad_audio_network(run, tmp_path, capsys, args, match):
    cache = json.loads((run / "config.json").read_text())["train"]["extra"]["cache"]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"extra": {"cache": cache}}))
    argv = ["train", *args, "--steps", "1", "--config", str(settings), "--out", str(tmp_path / "r")]
    one_line_exit_2(main, argv, capsys, match)
