import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import unnoise.modalities.audio.classifier as ac
from unnoise.modalities.audio.classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    digit_classifier,
    train_digit_classifier,
)
from unnoise.modalities.audio.features import log_mel, mel_filterbank
from unnoise.modalities.audio.metrics import accuracy, feature_distance, real_time_factor


def htk_edges(n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """The n_mels + 2 filter edges in Hz, equally spaced on m = 2595 log10(1 + f / 700), written out again."""
    f_max = sample_rate / 2 if f_max is None else f_max
    lo, hi = 2595 * math.log10(1 + f_min / 700), 2595 * math.log10(1 + f_max / 700)
    return np.array([700 * (10 ** ((lo + (hi - lo) * i / (n_mels + 1)) / 2595) - 1) for i in range(n_mels + 2)])


def tones(freqs, n_per: int, rate: int = 8000, samples: int = 2000, seed: int = 0, dtype=torch.float32):
    """n_per clips per frequency: random phase, gain 0.2..1, noise std 0.01; labels = index of the frequency."""
    g = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    waves, labels = [], []
    for label, f in enumerate(freqs):
        for _ in range(n_per):
            x = g.uniform(0.2, 1) * np.sin(2 * np.pi * f * t + g.uniform(0, 2 * np.pi))
            waves.append(x + 0.01 * g.standard_normal(samples))
            labels.append(label)
    return torch.tensor(np.array(waves), dtype=dtype), torch.tensor(labels)


SMALL = DigitClassifierConfig(channels=(8, 16), num_classes=3)


@pytest.fixture(scope="module")
def three_tones():
    """A classifier trained for 40 steps on tones at 3 frequencies, and held-out clips of the same kind."""
    freqs = (300.0, 900.0, 2000.0)
    train_w, train_l = tones(freqs, 20, seed=0)
    test_w, test_l = tones(freqs, 40, seed=1)
    model = train_digit_classifier(train_w, train_l, config=SMALL, steps=40, batch_size=16, seed=0)
    return model, test_w, test_l


# ---- mel filterbank and log-mel ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_fft", "n_mels", "rate", "f_min", "f_max"), [(256, 40, 8000, 0, None), (1024, 24, 16000, 100, 5000)]
)
def test_mel_filterbank_matches_htk_triangles(n_fft, n_mels, rate, f_min, f_max):
    fb = mel_filterbank(n_fft, n_mels, rate, f_min, f_max, dtype=torch.float64).numpy()
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    edges = htk_edges(n_mels, rate, f_min, f_max)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    for j in range(n_mels):
        lower, centre, upper = edges[j : j + 3]
        # Unit peak at the centre: on the bin grid, the nearest bin on each side is 1 - distance / half-width.
        below, above = freqs[freqs <= centre].max(), freqs[freqs >= centre].min()
        k_below, k_above = round(below * n_fft / rate), round(above * n_fft / rate)
        assert fb[j, k_below] == pytest.approx(max(0.0, 1 - (centre - below) / (centre - lower)), abs=1e-12)
        assert fb[j, k_above] == pytest.approx(max(0.0, 1 - (above - centre) / (upper - centre)), abs=1e-12)
        assert fb[j].max() <= 1 + 1e-12
        assert fb[j].argmax() in (k_below, k_above)
        # Zero outside (lower, upper), positive strictly inside.
        inside = (freqs > lower) & (freqs < upper)
        assert np.all(fb[j, ~inside] == 0) and np.all(fb[j, inside] > 0)
    # Tiling: between the first and last centres neighbouring triangles sum to exactly 1.
    interior = (freqs >= edges[1]) & (freqs <= edges[-2])
    np.testing.assert_allclose(fb[:, interior].sum(0), 1.0, atol=1e-12)


def test_mel_filterbank_peaks_move_up_and_reach_one_on_a_fine_grid():
    fb = mel_filterbank(8192, 40, 8000, dtype=torch.float64)
    peaks = fb.argmax(dim=1)
    assert torch.all(peaks[1:] > peaks[:-1])  # centres increase
    centres = htk_edges(40, 8000)[1:-1]
    np.testing.assert_array_equal(peaks.numpy(), np.round(centres * 8192 / 8000))  # each peaks at its centre bin
    assert torch.all(fb.max(dim=1).values > 0.95)  # a 0.98 Hz grid all but hits every centre


@pytest.mark.parametrize("band", [8, 20, 33])
@pytest.mark.parametrize("offset", [0.0, 0.3, -0.3])
def test_log_mel_of_a_tone_peaks_in_the_nearest_band(band, offset):
    rate, n_mels = 8000, 40
    centres = htk_edges(n_mels, rate)[1:-1]
    spacing = centres[band + 1] - centres[band] if offset > 0 else centres[band] - centres[band - 1]
    f = centres[band] + offset * spacing
    assert np.abs(centres - f).argmin() == band
    t = torch.arange(8000, dtype=torch.float64) / rate
    wave = 0.5 * torch.sin(2 * math.pi * f * t)[None]
    z = log_mel(wave, rate, n_mels=n_mels)
    assert z.shape == (1, n_mels, 1 + 8000 // 80) and z.dtype == torch.float64
    assert z[0, :, 10:-10].mean(dim=1).argmax() == band  # away from the reflection-padded edges


@pytest.mark.parametrize(
    ("waves", "match"),
    [
        (torch.zeros(2, 800, dtype=torch.int16), "float tensor"),
        (torch.zeros(800), r"\(N, samples\)"),
        (torch.zeros(1, 2, 800), r"\(N, samples\)"),
        (torch.zeros(0, 800), "non-empty"),
        (torch.zeros(2, 0), "non-empty"),
        (torch.zeros(2, 100), "longer than n_fft // 2 = 128"),
        ([[0.0] * 800], "got list"),
    ],
)
def test_log_mel_rejects_bad_waves(waves, match):
    with pytest.raises(ValueError, match=match):
        log_mel(waves, 8000)


def test_mel_arguments_are_checked():
    with pytest.raises(ValueError, match="f_max <= sample_rate / 2"):
        mel_filterbank(256, 40, 8000, f_max=5000)
    with pytest.raises(ValueError, match="n_mels must be a positive int"):
        mel_filterbank(256, 0, 8000)
    with pytest.raises(ValueError, match="hop must be a positive int"):
        log_mel(torch.zeros(1, 800), 8000, hop=0)


# ---- the classifier -------------------------------------------------------------------------------------


def test_front_end_ignores_loudness_and_features_ignore_the_batch():
    model = DigitClassifier(SMALL).double()
    noise = 0.3 * torch.randn(4, 2000, dtype=torch.float64)  # broadband: every bin far above the 1e-6 floor
    torch.testing.assert_close(model.front_end(0.5 * noise), model.front_end(noise), atol=1e-3, rtol=0)
    x, _ = tones((440.0, 1200.0), 3, dtype=torch.float64)
    f = model.features(x)
    assert f.shape == (6, SMALL.channels[-1])
    torch.testing.assert_close(model.features(x[:2]), f[:2])  # GroupNorm: no batch statistics
    assert model(x).shape == (6, 3)


def test_classifier_learns_three_tones(three_tones):
    model, test_w, test_l = three_tones
    assert not model.training
    assert accuracy(model, test_w, test_l) == 1.0


def test_feature_distance_is_zero_for_one_set_and_large_across_classes(three_tones):
    model, test_w, test_l = three_tones
    a, b = test_w[test_l == 0], test_w[test_l == 1]  # 40 clips each, features 16-D
    assert abs(feature_distance(model, a, a)) < 1e-6
    within = feature_distance(model, a[:20], a[20:])  # two samples of one class
    across = feature_distance(model, a, b)
    assert across > 10 * within, (within, across)


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    w, l = tones((300.0, 900.0, 2000.0), 4)
    before = torch.get_rng_state()
    m1 = train_digit_classifier(w, l, config=SMALL, steps=3, batch_size=5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    m2 = train_digit_classifier(w, l, config=SMALL, steps=3, batch_size=5, seed=7)
    m3 = train_digit_classifier(w, l, config=SMALL, steps=3, batch_size=5, seed=8)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_training_and_metrics_reject_bad_labels():
    w, l = tones((300.0, 900.0), 2)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        train_digit_classifier(w, l + 2, config=SMALL, steps=1)
    with pytest.raises(ValueError, match="long tensor"):
        train_digit_classifier(w, l.float(), config=SMALL, steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_digit_classifier(w, l, config=SMALL, steps=0)
    model = DigitClassifier(SMALL)
    with pytest.raises(ValueError, match="N = len"):
        accuracy(model, w, l[:2])
    with pytest.raises(ValueError, match="at least 2 clips"):
        feature_distance(model, w[:1], w)
    with pytest.raises(ValueError, match="real must be a non-empty float tensor"):
        feature_distance(model, w, w.long())


def test_real_time_factor():
    assert real_time_factor(5.0, 10, 1.0) == 0.5  # 5 s of compute for 10 s of audio
    assert real_time_factor(3.0, 4, 0.5) == 1.5
    assert real_time_factor(0, 1, 1.0) == 0.0
    for args, match in [
        ((-1.0, 1, 1.0), "seconds_of_compute must be a finite number >= 0"),
        ((math.nan, 1, 1.0), "seconds_of_compute"),
        ((1.0, 0, 1.0), "clips must be a positive int"),
        ((1.0, 2.5, 1.0), "clips must be a positive int"),
        ((1.0, 1, 0.0), "clip_seconds must be a finite number > 0"),
        ((1.0, 1, math.inf), "clip_seconds"),
    ]:
        with pytest.raises(ValueError, match=match):
            real_time_factor(*args)


# ---- the cache --------------------------------------------------------------------------------------------


def _no_training(*args, **kwargs):
    raise AssertionError("trained although a matching cache exists")


def test_cache_loads_matching_weights_and_retrains_on_new_data(tmp_path, monkeypatch):
    monkeypatch.setitem(ac._RECIPE, "steps", 2)
    w, l = tones((300.0, 900.0, 2000.0), 3)
    path = tmp_path / "clf"
    config = DigitClassifierConfig(channels=(4,), num_classes=3)
    first = ac._cached_classifier(w, l, 0.25, config, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temp folders left
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "weights.safetensors"]
    sidecar = json.loads((path / "meta.json").read_text())
    assert sidecar["data"]["clips"] == 9 and sidecar["config"]["channels"] == [4] and sidecar["train"]["steps"] == 2

    with monkeypatch.context() as m:
        m.setattr(ac, "train_digit_classifier", _no_training)
        loaded = ac._cached_classifier(w, l, 0.25, config, path)
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in first.state_dict().items())

    calls = []
    monkeypatch.setattr(ac, "train_digit_classifier", lambda *a, **k: calls.append(1) or first)
    ac._cached_classifier(w.flip(0), l.flip(0), 0.25, config, path)  # the same clips in another order: new data
    ac._cached_classifier(w, l, 0.25, DigitClassifierConfig(channels=(5,), num_classes=3), path)  # new config
    assert len(calls) == 2


def test_cache_never_unpickles_and_retrains_over_a_damaged_file(tmp_path, monkeypatch):
    monkeypatch.setitem(ac._RECIPE, "steps", 2)
    w, l = tones((300.0, 900.0, 2000.0), 3)
    folder, config = tmp_path / "clf", DigitClassifierConfig(channels=(4,), num_classes=3)
    ac._cached_classifier(w, l, 0.25, config, folder)
    path = folder / "weights.safetensors"
    torch.save(DigitClassifier(config).state_dict(), path)  # a pickle where the weights were
    with pytest.warns(UserWarning, match="pickle"):
        ac._cached_classifier(w, l, 0.25, config, folder)
    assert path.read_bytes()[:2] != b"PK"  # rewritten as safetensors
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="not a valid safetensors"):
        ac._cached_classifier(w, l, 0.25, config, folder)


# ---- the spoken-digit classifier ------------------------------------------------------------------------


@pytest.mark.slow
def test_digit_classifier_on_spoken_digits(tmp_path, monkeypatch):
    if shutil.which("espeak-ng") is None and not any((Path.home() / ".cache/unnoise/spoken-digits").glob("*/*.wav")):
        pytest.skip("needs espeak-ng (apt-get install espeak-ng) or ~/.cache/unnoise/spoken-digits to build the data")
    from unnoise.modalities.audio.data import load_asterisk_digits, load_wav_folder, split_clips, spoken_digits_folder

    start = time.perf_counter()
    model = digit_classifier(cache=tmp_path)
    print(f"\ndigit classifier: data + training {time.perf_counter() - start:.1f} s")
    assert (tmp_path / "digit-classifier-8000hz-1s" / "weights.safetensors").is_file()
    test = split_clips(load_wav_folder(spoken_digits_folder(), sample_rate=8000, seconds=1.0), "test")
    held_out = accuracy(model, test.waves, test.labels)
    print(f"digit classifier: held-out spoken-digit accuracy {held_out:.3f} ({len(test)} clips)")
    assert held_out >= 0.9

    monkeypatch.setattr(ac, "train_digit_classifier", _no_training)
    assert accuracy(digit_classifier(cache=tmp_path), test.waves, test.labels) == held_out  # loaded, not retrained
    try:
        asterisk = load_asterisk_digits()
    except FileNotFoundError:
        return
    # Ten real recordings of one speaker: reported, not asserted beyond running.
    print(
        f"digit classifier: accuracy on the 10 Asterisk recordings {accuracy(model, asterisk.waves, asterisk.labels)}"
    )
