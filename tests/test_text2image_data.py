"""fashion-scenes: scenes, captions in every template, the prompt parser's round trip, and captioned folders."""

import json
import random

import numpy as np
import pytest
import torch

from unnoise.modalities.image.data import ImageDataset
from unnoise.modalities.text2image.captions import CLASS_NAMES, TEMPLATES, Scene, caption, parse_prompt
from unnoise.modalities.text2image.data import (
    draw_scene,
    fashion_scenes,
    load_captioned_folder,
    render_scene,
    scene_labels,
)


def flat_pool(per_class: int = 3) -> ImageDataset:
    """28x28 items whose every pixel is 20 * (class + 1) + item: the canvas says which item went where."""
    labels = torch.arange(10).repeat_interleave(per_class)
    values = 20 * (labels + 1) + torch.arange(len(labels)) % per_class
    images = values.reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28).to(torch.uint8).contiguous()
    return ImageDataset(images, labels, list(CLASS_NAMES))


def random_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng) for _ in range(n)]


def test_captions_read_as_the_issue_writes_them():
    scene = Scene((7, None, None, 8))
    assert caption(scene, "natural") == "a sneaker in the top left and a bag in the bottom right"
    assert caption(scene, "list") == "top-left: sneaker; bottom-right: bag"
    assert caption(Scene((None, 9, None, None)), "upper") == "an ankle boot at the upper right"
    assert caption(scene, "corner") == (
        "a picture with a sneaker in the top left corner and a bag in the bottom right corner"
    )
    three = Scene((0, 1, None, 3))
    assert caption(three, "natural", order=(2, 0, 1)) == (
        "a dress in the bottom right, a T-shirt/top in the top left and a trouser in the top right"
    )


def test_articles_follow_the_noun():
    for c, name in enumerate(CLASS_NAMES):
        text = caption(Scene((c, None, None, None)), "natural")
        assert text.startswith(("an " if name[0] in "aeiou" else "a ") + name), text


@pytest.mark.parametrize("template", TEMPLATES)
def test_parse_prompt_inverts_every_template_in_any_order(template):
    rng = random.Random(template)
    scenes = random_scenes(300, seed=len(template)) + [Scene(tuple(range(c, c + 4))) for c in range(7)]
    for scene in scenes:
        order = list(range(len(scene)))
        rng.shuffle(order)
        assert parse_prompt(caption(scene, template)) == scene
        assert parse_prompt(caption(scene, template, order)) == scene


def test_parse_prompt_tolerates_case_spaces_and_a_period_and_names_what_it_cannot_read():
    assert parse_prompt("  A T-shirt/top in the Top-Left,  and an Ankle Boot at the lower right. ") == Scene(
        (0, None, None, 9)
    )
    assert parse_prompt("bottom left : shirt") == Scene((None, None, 6, None))  # "shirt", not "T-shirt/top"
    assert parse_prompt("top-left: bag; bottom-right: coat;") == Scene((8, None, None, 4))
    assert parse_prompt("top left: bag, lower right: an ankle boot") == Scene((8, None, None, 9))
    with pytest.raises(ValueError, match="empty prompt"):
        parse_prompt("   ")
    with pytest.raises(ValueError, match="cannot read 'a hat in the top left'"):
        parse_prompt("a bag in the bottom left and a hat in the top left")
    with pytest.raises(ValueError, match="two objects in the top left"):
        parse_prompt("a bag in the top left and a coat in the upper left")


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="1 to 4 objects"):
        Scene((None,) * 4)
    with pytest.raises(ValueError, match="4 cells"):
        Scene((1, 2))
    with pytest.raises(ValueError, match="class ids 0..9"):
        Scene((10, None, None, None))
    with pytest.raises(ValueError, match="template"):
        caption(Scene((1, None, None, None)), "poem")


def test_render_scene_puts_each_item_in_its_cell():
    pool, rng = flat_pool(), np.random.default_rng(0)
    scene = Scene((None, 3, 8, None))
    canvas = render_scene(scene, pool, rng)
    assert canvas.shape == (1, 56, 56) and canvas.dtype == torch.uint8
    cells = canvas[0].reshape(2, 28, 2, 28).permute(0, 2, 1, 3).reshape(4, 28 * 28)
    for cell, c in enumerate(scene.cells):
        values = cells[cell].unique().tolist()
        assert values == [0] if c is None else len(values) == 1 and values[0] // 20 - 1 == c


def test_fashion_scenes_are_deterministic_and_agree_with_their_captions():
    pool = flat_pool()
    a = fashion_scenes(200, seed=3, pool=pool)
    b = fashion_scenes(200, seed=3, pool=pool)
    c = fashion_scenes(200, seed=4, pool=pool)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.scenes == b.scenes
    assert a.captions != c.captions
    assert a.images.shape == (200, 1, 56, 56)
    assert [parse_prompt(t) for t in a.captions] == a.scenes
    labels = scene_labels(a.scenes)
    cells = a.images[:, 0].reshape(-1, 2, 28, 2, 28)[:, :, 0, :, 0].reshape(-1, 4).long()  # one pixel per cell
    torch.testing.assert_close(torch.where(cells > 0, cells // 20 - 1, -1), labels)
    counts = np.bincount([len(s) for s in a.scenes], minlength=5)
    assert counts[0] == 0 and all(counts[1:] > 30)  # 1..4 objects, each about a quarter
    assert {t.split()[0] for t in a.captions} >= {"a", "an", "top-left:", "bottom-right:"}


def test_fashion_scenes_from_the_real_test_split():
    try:
        scenes = fashion_scenes(8, "test", seed=0, objects=(2, 2))
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert scenes.images.shape == (8, 1, 56, 56) and all(len(s) == 2 for s in scenes.scenes)
    assert torch.equal(fashion_scenes(8, "test", seed=0, objects=(2, 2)).images, scenes.images)
    empty = scene_labels(scenes.scenes).reshape(-1, 2, 1, 2, 1) < 0
    cells = scenes.images[:, 0].reshape(-1, 2, 28, 2, 28)
    assert (cells.masked_select(empty.expand_as(cells)) == 0).all()


def write_folder(root, rows, images=("a.png", "b.png")):
    from PIL import Image

    root.mkdir(exist_ok=True)
    for i, name in enumerate(images):
        Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(root / name)
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def test_captioned_folder_loads_images_and_texts(tmp_path):
    rows = [
        json.dumps({"file_name": "a.png", "text": "a dark one"}),
        "",
        json.dumps({"file_name": "b.png", "text": "é"}),
    ]
    write_folder(tmp_path / "f", rows)
    data = load_captioned_folder(tmp_path / "f", size=8, mode="L")
    assert data.images.shape == (2, 1, 8, 8) and data.captions == ["a dark one", "é"]
    assert data.images[0].max() == 0 and data.images[1].min() == 40


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_captioned_folder_errors_name_the_file_and_line(tmp_path):
    good = json.dumps({"file_name": "a.png", "text": "x"})
    write_folder(tmp_path / "json", [good, '{"file_name": "b.png", "text": '])
    with pytest.raises(ValueError) as err:
        load_captioned_folder(tmp_path / "json", size=8)
    assert "metadata.jsonl line 2: not valid JSON" in one_line(err)

    write_folder(tmp_path / "missing", [good, json.dumps({"file_name": "c.png", "text": "y"})])
    with pytest.raises(ValueError) as err:
        load_captioned_folder(tmp_path / "missing", size=8)
    assert "line 2: file_name 'c.png' is not a file" in one_line(err)

    write_folder(tmp_path / "keys", [json.dumps({"file": "a.png", "text": "x"})])
    with pytest.raises(ValueError) as err:
        load_captioned_folder(tmp_path / "keys", size=8)
    assert 'line 1: need an object with string "file_name" and "text"' in one_line(err)

    write_folder(tmp_path / "corrupt", [good, json.dumps({"file_name": "b.png", "text": "y"})])
    (tmp_path / "corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError) as err:
        load_captioned_folder(tmp_path / "corrupt", size=8)
    assert "metadata.jsonl line 2: cannot read image" in one_line(err) and "b.png" in one_line(err)

    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        load_captioned_folder(tmp_path / "none", size=8)
