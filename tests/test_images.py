"""Image data (loaders, encode/decode) and image writers (PNG grid, NPZ, trajectory)."""

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from unnoise.modalities.image import data as image_data
from unnoise.modalities.image.data import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    load_digits,
    load_fashion_mnist,
    load_folder,
    load_images,
    to_model,
    to_uint8,
)
from unnoise.modalities.image.io import save_grid, save_npz, save_trajectory

Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- encode / decode


def test_to_model_to_uint8_exact_on_all_levels():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_model(levels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), levels)
    assert torch.equal(to_uint8(to_model(levels, torch.float64)), levels)


def test_to_uint8_clamps_and_rejects_bad_input():
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="uint8"):
        to_model(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8(torch.zeros(3, dtype=torch.uint8))


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a"])


# ----------------------------------------------------------------------------- digits


def test_digits():
    pytest.importorskip("sklearn")
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.images.min() == 0 and data.images.max() == 255
    assert data.labels.dtype == torch.long and data.labels.shape == (1797,)
    assert set(data.labels.tolist()) == set(range(10)) and data.class_names == [str(d) for d in range(10)]
    # 0..16 -> round(x * 255 / 16): every value is one of those 17 levels
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(data.images.unique().tolist()) <= levels
    assert len(data) == 1797


# ----------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_on_tiny_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (5, 28, 28)), np.array([0, 9, 3, 3, 1])
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", pixels, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    data = load_fashion_mnist("test", path=tmp_path)
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(pixels.astype(np.uint8)))
    assert data.labels.tolist() == labels.tolist() and data.class_names == FASHION_MNIST_CLASSES
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", path=tmp_path)


def test_fashion_mnist_mismatched_counts(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), False)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist("test", path=tmp_path)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(path=tmp_path / "nowhere")
    monkeypatch.setattr(image_data, "FASHION_MNIST_DIRS", (str(tmp_path / "none"), str(tmp_path / "*" / "none")))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_fashion_mnist("valid")


@pytest.fixture(scope="module")
def fashion_dir():
    folder = image_data._fashion_mnist_dir(("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    if folder is None:
        pytest.skip("Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
    return folder


def test_fashion_mnist_debian(fashion_dir):
    for split, n in (("train", 60000), ("test", 10000)):
        data = load_fashion_mnist(split)
        assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert torch.equal(data.labels.bincount(), torch.full((10,), n // 10))
        assert data.class_names == FASHION_MNIST_CLASSES


def test_fashion_mnist_corrupt_copies(fashion_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = image_data._find_idx(fashion_dir, name)
        shutil.copy(src, tmp_path / f"{name}.gz" if src.suffix == ".gz" else tmp_path / name)
    images_gz = image_data._find_idx(tmp_path, "t10k-images-idx3-ubyte")
    assert load_fashion_mnist("test", path=tmp_path).images.shape == (10000, 1, 28, 28)
    stored = images_gz.read_bytes()
    raw = gzip.decompress(stored) if images_gz.suffix == ".gz" else stored

    # a truncated gzip stream
    images_gz.write_bytes((stored if images_gz.suffix == ".gz" else gzip.compress(raw, 1))[:5000])
    with pytest.raises(ValueError, match=images_gz.name):
        load_fashion_mnist("test", path=tmp_path)
    # a complete gzip stream of a truncated IDX file
    images_gz.write_bytes(gzip.compress(raw[: len(raw) // 2], 1))
    with pytest.raises(ValueError, match=f"truncated.*{images_gz.name}"):
        load_fashion_mnist("test", path=tmp_path)
    # an uncompressed, truncated IDX file is read too (and wins over the .gz)
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=f"{plain.name}:"):
        load_fashion_mnist("test", path=tmp_path)
    # wrong magic number (a labels header where images belong)
    plain.write_bytes(b"\x00\x00\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="magic number 0x00000801"):
        load_fashion_mnist("test", path=tmp_path)


# ----------------------------------------------------------------------------- folders


def _save(path, size, color, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "classA" / "a1.png", (40, 30), (255, 0, 0))
    _save(root / "classA" / "a2.jpeg", (20, 50), (0, 255, 0))
    _save(root / "classB" / "b1.PNG", (64, 64), 200, mode="L")
    _save(root / "classB" / "nested" / "b2.JPG", (17, 33), (0, 0, 255), fmt="JPEG")
    (root / "classB" / "bad.png").write_bytes(b"not an image")
    (root / "classB" / "notes.txt").write_text("ignored")
    (root / "classB" / "._b1.PNG").write_bytes(b"macOS metadata")  # hidden: ignored
    _save(root / ".cache" / "c.png", (8, 8), (1, 2, 3))  # hidden folder: ignored, not a class
    (root / "empty_class").mkdir()
    return root


def test_folder_fail_names_the_corrupt_file(folder):
    with pytest.raises(ValueError, match="bad.png") as err:
        load_folder(folder, size=16)
    assert "\n" not in str(err.value)


def test_folder_skip_warns(folder):
    with pytest.warns(UserWarning, match="bad.png"):
        data = load_folder(folder, size=16, on_error="skip")
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == ["classA", "classB"]
    assert data.labels.tolist() == [0, 0, 1, 1]  # sorted files: a1, a2, b1, nested/b2
    # colours survive resize and crop
    assert data.images[0, :, 8, 8].tolist() == [255, 0, 0] and data.images[2, :, 8, 8].tolist() == [200] * 3
    assert abs(data.images[3, :, 8, 8].float() - torch.tensor([0.0, 0.0, 255.0])).max() < 8  # JPEG


def test_folder_grey_and_unlabelled(folder):
    (folder / "classB" / "bad.png").unlink()
    (folder / "top.jpg").write_bytes((folder / "classA" / "a2.jpeg").read_bytes())
    data = load_folder(folder, size=8, mode="L")
    assert data.images.shape == (5, 1, 8, 8)
    assert data.labels.tolist() == [0, 0, 1, 1, -1]  # an image in the root itself has no class
    flat = load_folder(folder, size=8, labels_from_subfolders=False)
    assert flat.labels.tolist() == [-1] * 5 and flat.class_names == []


def test_folder_resize_then_center_crop(tmp_path):
    # 90 x 30 image, thirds red | green | blue: shorter side 30 -> 10 makes 30 x 10; the crop is the green third
    stripes = np.zeros((30, 90, 3), np.uint8)
    stripes[:, :30, 0] = stripes[:, 30:60, 1] = stripes[:, 60:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "s.png")
    data = load_folder(tmp_path, size=10)
    assert data.images.shape == (1, 3, 10, 10) and data.labels.tolist() == [-1]
    middle = data.images[0, :, :, 2:8].float().mean(dim=(1, 2))
    assert middle[1] > 240 and middle[0] < 15 and middle[2] < 15
    # tall image: the long side is cropped, the short side fills the output
    Image.fromarray(stripes.transpose(1, 0, 2).copy()).save(tmp_path / "s.png")
    middle = load_folder(tmp_path, size=10).images[0, :, 2:8, :].float().mean(dim=(1, 2))
    assert middle[1] > 240


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_folder(tmp_path, size=8)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_folder(tmp_path, size=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_folder(tmp_path / "missing", size=8)
    _save(tmp_path / "a.png", (8, 8), (1, 2, 3))
    with pytest.raises(ValueError, match="size"):
        load_folder(tmp_path, size=0)
    with pytest.raises(ValueError, match="'L'.*'RGB'"):
        load_folder(tmp_path, size=8, mode="CMYK")
    with pytest.raises(ValueError, match="'skip', 'fail'"):
        load_folder(tmp_path, size=8, on_error="ignore")
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be read"):
        load_folder(tmp_path, size=8, on_error="skip")


# ----------------------------------------------------------------------------- dispatch


def test_load_images_dispatch(folder, tmp_path):
    (folder / "classB" / "bad.png").unlink()
    data = load_images(str(folder), size=12, mode="L")
    assert data.images.shape == (4, 1, 12, 12)
    with pytest.raises(ValueError, match="'digits'.*fashion-mnist"):
        load_images("imagenet")
    with pytest.raises(ValueError, match="digits"):
        load_images(str(tmp_path / "no-such-folder"))
    with pytest.raises(ValueError, match="size"):
        load_images(str(folder))  # a folder needs size=
    with pytest.raises(ValueError, match="bad options"):
        load_images("digits", size=8)
    with pytest.raises(FileNotFoundError, match="apt-get"):
        load_images("fashion-mnist", path=tmp_path / "nowhere")
    pytest.importorskip("sklearn")
    assert load_images("digits").images.shape == (1797, 1, 8, 8)


# ----------------------------------------------------------------------------- writers


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary files left behind


def test_save_grid(tmp_path):
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    out = save_grid(tmp_path / "grid.png", images, nrow=4, padding=2, scale=3)
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (4 * (24 + 2) + 2, 3 * (24 + 2) + 2)
        grid = torch.from_numpy(np.array(im))
    assert torch.equal(grid[2:26, 2:26], images[0, 0].repeat_interleave(3, 0).repeat_interleave(3, 1))
    assert torch.equal(grid[28:52, 2 + 26 : 26 + 26], images[5, 0].repeat_interleave(3, 0).repeat_interleave(3, 1))
    rgb = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    save_grid(tmp_path / "rgb.png", rgb)  # default nrow = ceil(sqrt(5)) = 3
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB" and im.size == (3 * 9 + 2, 2 * 8 + 2)
        assert np.array_equal(np.asarray(im)[2:8, 2:9], rgb[0].permute(1, 2, 0).numpy())
    _only(tmp_path, "grid.png", "rgb.png")
    with pytest.raises(ValueError, match="uint8"):
        save_grid(tmp_path / "x.png", torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="scale"):
        save_grid(tmp_path / "x.png", images, scale=0)
    _only(tmp_path, "grid.png", "rgb.png")


def test_save_npz(tmp_path):
    images = torch.randint(0, 256, (6, 3, 5, 4), dtype=torch.uint8)
    save_npz(tmp_path / "s.npz", images, torch.arange(6))
    save_npz(tmp_path / "sub" / "u.npz", images[:, :1])
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["images", "labels"]
        assert f["images"].dtype == np.uint8 and f["images"].shape == (6, 5, 4, 3)
        assert np.array_equal(f["images"], images.permute(0, 2, 3, 1).numpy())
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == list(range(6))
    with np.load(tmp_path / "sub" / "u.npz") as f:
        assert f["images"].shape == (6, 5, 4, 1) and f["labels"].tolist() == [-1] * 6
    with pytest.raises(ValueError, match="labels"):
        save_npz(tmp_path / "bad.npz", images, torch.zeros(5, dtype=torch.long))
    _only(tmp_path, "s.npz", "sub")


def test_save_trajectory(tmp_path):
    n, frames = 3, [(f"sigma={s}", torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)) for s in (80, 1, 0)]
    save_trajectory(tmp_path / "plain.png", frames, padding=1, scale=2, labels=False)
    with Image.open(tmp_path / "plain.png") as im:
        assert im.mode == "RGB" and im.size == (3 * 17 + 1, n * 17 + 1)
        pixels = np.asarray(im)
    # row = sample, column = frame
    assert np.array_equal(
        pixels[1 + 17 : 1 + 17 + 16 : 2, 1 + 2 * 17 : 1 + 2 * 17 + 16 : 2], frames[2][1][1].permute(1, 2, 0)
    )
    save_trajectory(tmp_path / "labelled.png", frames, padding=1, scale=2)
    with Image.open(tmp_path / "labelled.png") as im:
        band = im.height - (n * 17 + 1)
        assert im.width == 3 * 17 + 1 and band > 0
        assert np.array_equal(np.asarray(im)[band:], pixels)  # the grid sits under the text band
    with pytest.raises(ValueError, match="same shape"):
        save_trajectory(tmp_path / "x.png", [("a", frames[0][1]), ("b", frames[1][1][:2])])
    with pytest.raises(ValueError, match="empty"):
        save_trajectory(tmp_path / "x.png", [])
    _only(tmp_path, "plain.png", "labelled.png")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    target = save_npz(tmp_path / "s.npz", images)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_npz(target, images + 1)
    assert target.read_bytes() == before
    _only(tmp_path, "s.npz")
