import math
import shutil
import wave

import numpy as np
import pytest
import torch

from unnoise.modalities.audio.data import (
    AudioDataset,
    load_asterisk_digits,
    load_wav_folder,
    make_spoken_digits,
    split_clips,
    spoken_digits_folder,
)
from unnoise.modalities.audio.io import save_spectrogram_grid, save_wav
from unnoise.modalities.audio.wav import fit_length, normalise, read_wav, resample


def write_wav(path, x: np.ndarray, rate: int, width: int = 2) -> None:
    """x float (samples,) or (samples, channels) in [-1, 1] -> PCM WAV of the given sample width."""
    x = x if x.ndim == 2 else x[:, None]
    if width == 1:
        pcm = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8)
    else:
        pcm = np.round(x * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(x.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)


def peak_hz(y: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(y * torch.hann_window(len(y))).abs()
    return spectrum.argmax().item() * rate / len(y)


@pytest.mark.parametrize("width, tol", [(1, 1 / 127), (2, 1 / 32767), (4, 1e-6)])
@pytest.mark.parametrize("rate", [8000, 22050])
def test_read_wav_round_trip(tmp_path, width, tol, rate):
    x = sine(440, rate, 0.1)
    write_wav(tmp_path / "a.wav", x, rate, width)
    y, got_rate = read_wav(tmp_path / "a.wav")
    assert got_rate == rate and y.dtype == torch.float32 and y.shape == (len(x),)
    assert np.abs(y.numpy() - x).max() <= tol


def test_read_wav_mixes_stereo_to_mono(tmp_path):
    left, right = sine(440, 8000, 0.1), sine(1000, 8000, 0.1)
    write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), 8000)
    y, _ = read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(y.numpy(), (left + right) / 2, atol=2e-4)


def test_read_wav_rejects_bad_files(tmp_path):
    (tmp_path / "text.wav").write_text("not audio at all")
    write_wav(tmp_path / "full.wav", sine(440, 8000, 0.1), 8000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "full.wav").read_bytes()[:500])
    write_wav(tmp_path / "empty.wav", np.zeros(0), 8000)
    for name in ("text.wav", "cut.wav", "empty.wav"):
        with pytest.raises(ValueError, match=name):
            read_wav(tmp_path / name)


def test_resample_keeps_frequency_and_length():
    for from_rate, to_rate, freq in [(22050, 8000, 440), (16000, 8000, 1000), (8000, 22050, 700), (11025, 8000, 3000)]:
        y = resample(torch.from_numpy(sine(freq, from_rate)).float(), from_rate, to_rate)
        assert y.shape == (to_rate,)
        assert abs(peak_hz(y, to_rate) - freq) <= 1
        assert abs(y[500:-500].abs().max().item() - 0.5) < 0.01  # passband gain 1


def test_resample_low_passes_when_downsampling():
    # 6 kHz is above the 4 kHz Nyquist of 8 kHz: naive decimation would alias it to 2 kHz at full amplitude
    y = resample(torch.from_numpy(sine(6000, 22050)).float(), 22050, 8000)
    assert y[500:-500].abs().max() < 0.01


def test_resample_batches_and_identity():
    x = torch.randn(3, 1000)
    assert torch.equal(resample(x, 8000, 8000), x)
    batched = resample(x, 16000, 8000)
    assert batched.shape == (3, 500)
    torch.testing.assert_close(batched[1], resample(x[1], 16000, 8000))


def test_fit_length_and_normalise():
    x = torch.arange(1.0, 11.0)
    assert fit_length(x, 4).tolist() == [4, 5, 6, 7]
    padded = fit_length(x, 14)
    assert padded.tolist() == [0, 0] + x.tolist() + [0, 0]
    assert fit_length(torch.ones(2, 3), 5).shape == (2, 5)
    y = normalise(torch.stack([torch.tensor([0.1, -0.2, 0.05]), torch.zeros(3)]))
    torch.testing.assert_close(y[0], torch.tensor([0.475, -0.95, 0.2375]))
    assert torch.equal(y[1], torch.zeros(3))


def make_folder(root, bad: bool = False):
    for label, freq in [("high", 1500), ("low", 300)]:
        (root / label).mkdir(parents=True)
        for i, rate in enumerate((8000, 16000)):
            write_wav(root / label / f"{i}.wav", sine(freq, rate, 0.5), rate)
    if bad:
        (root / "low" / "broken.wav").write_text("oops")


def test_load_wav_folder_subfolders(tmp_path):
    make_folder(tmp_path)
    ds = load_wav_folder(tmp_path, sample_rate=8000, seconds=1.0)
    assert isinstance(ds, AudioDataset) and ds.waves.shape == (4, 8000) and ds.sample_rate == 8000
    assert ds.class_names == ["high", "low"] and ds.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(ds.waves.abs().amax(1), torch.full((4,), 0.95))
    assert peak_hz(ds.waves[0], 8000) == pytest.approx(1500, abs=2)
    assert ds.waves[:, :1000].abs().max() == 0  # 0.5 s clip centred in 1 s: zeros before
    unlabelled = load_wav_folder(tmp_path, labels_from_subfolders=False)
    assert unlabelled.labels.tolist() == [-1] * 4 and unlabelled.class_names == []


def test_load_wav_folder_csv(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nhigh/0.wav,10\nlow/1.wav,2\nlow/0.wav,2\n")
    ds = load_wav_folder(tmp_path, csv=tmp_path / "labels.csv")
    assert ds.class_names == ["2", "10"] and ds.labels.tolist() == [1, 0, 0] and len(ds) == 3


def test_load_wav_folder_bad_files(tmp_path):
    make_folder(tmp_path, bad=True)
    with pytest.raises(ValueError, match="broken.wav"):
        load_wav_folder(tmp_path)
    with pytest.warns(UserWarning, match="broken.wav"):
        ds = load_wav_folder(tmp_path, on_error="skip")
    assert len(ds) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no WAV files"):
        load_wav_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_error"):
        load_wav_folder(tmp_path, on_error="ignore")


def test_save_wav_round_trip(tmp_path):
    x = torch.from_numpy(sine(440, 8000, 0.25)).float() * 2.5  # clipped to [-1, 1]
    path = save_wav(tmp_path / "out" / "a.wav", x, 8000)
    y, rate = read_wav(path)
    assert rate == 8000
    torch.testing.assert_close(y, x.clamp(-1, 1), atol=1.5 / 32767, rtol=0)  # rounding + 32767 vs 32768 scale
    assert [p.name for p in path.parent.iterdir()] == ["a.wav"]  # no temporary left behind
    with pytest.raises(ValueError, match="wave"):
        save_wav(tmp_path / "b.wav", torch.zeros(2, 10), 8000)


def test_save_spectrogram_grid_size(tmp_path):
    from PIL import Image

    waves = torch.randn(5, 8000) * 0.1
    path = save_spectrogram_grid(tmp_path / "s.png", waves, 8000, ncols=3)
    h, w = 256 // 2 + 1, 1 + 8000 // 64  # n_fft 256 at 8 kHz, hop 64
    with Image.open(path) as im:
        assert im.size == (3 * (w + 2) + 2, 2 * (h + 2) + 2)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_make_spoken_digits(tmp_path):
    out = make_spoken_digits(tmp_path, voices=["en-us"], speeds=[160], pitches=[40, 60], flite_voices=["slt"])
    per_digit = 2 + (shutil.which("flite") is not None)
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    ds = load_wav_folder(out, sample_rate=8000)
    assert ds.class_names == [str(d) for d in range(10)] and ds.waves.shape == (10 * per_digit, 8000)
    assert torch.equal(ds.labels.bincount(), torch.full((10,), per_digit))
    assert (ds.waves.abs().amax(1) > 0.9).all()


def test_split_clips_is_a_fixed_90_10_partition():
    waves = torch.arange(50.0)[:, None].repeat(1, 4)  # clip i holds the value i
    data = AudioDataset(waves, torch.arange(50) % 10, [str(d) for d in range(10)], 8000)
    train, held = split_clips(data, "train"), split_clips(data, "test")
    assert (len(train), len(held)) == (45, 5) and train.sample_rate == 8000 and train.class_names == data.class_names
    ids = sorted(train.waves[:, 0].long().tolist() + held.waves[:, 0].long().tolist())
    assert ids == list(range(50)) and torch.equal(train.labels, train.waves[:, 0].long() % 10)
    assert torch.equal(split_clips(data, "train").waves, train.waves)  # the same split every time


def test_spoken_digits_folder_reuses_a_built_folder(tmp_path):
    (tmp_path / "3").mkdir()
    write_wav(tmp_path / "3" / "a.wav", np.zeros(100), 8000)
    assert spoken_digits_folder(tmp_path) == tmp_path  # clips already there: nothing synthesised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


@pytest.mark.skipif(shutil.which("espeak-ng") is not None, reason="espeak-ng is installed")
def test_make_spoken_digits_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        make_spoken_digits(tmp_path)


def test_load_asterisk_digits():
    try:
        ds = load_asterisk_digits()
    except FileNotFoundError as err:
        assert "asterisk-core-sounds-en-wav" in str(err)
        pytest.skip("asterisk-core-sounds-en-wav not installed")
    assert ds.waves.shape == (10, 8000) and ds.sample_rate == 8000
    assert ds.labels.tolist() == list(range(10)) and ds.class_names == [str(d) for d in range(10)]
    assert torch.isfinite(ds.waves).all() and math.isclose(ds.waves.abs().max().item(), 0.95, rel_tol=1e-5)
