"""Audio end to end on a tiny DiffWave: train on synthesised spoken digits, sample WAVs, errors."""

import json
import shutil

import pytest
from conftest import one_line_exit_2

from unnoise.cli import main


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
    from unnoise.data.audio import read_wav

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
