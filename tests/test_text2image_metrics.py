"""Prompt following: cells, the per-scene score against closed-form counts, the cell classifier on toy items."""

import math

import numpy as np
import pytest
import torch
from test_text2image_data import flat_pool

from unnoise.modalities.image.data import ImageDataset, to_model
from unnoise.modalities.text2image.captions import CELLS, CLASS_NAMES, Scene
from unnoise.modalities.text2image.data import draw_scene, real_scenes, render_scene, scene_labels
from unnoise.modalities.text2image.metrics import (
    EMPTY,
    CellClassifier,
    predict_cells,
    prompt_following,
    split_cells,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class FlatReader(torch.nn.Module):
    """Reads flat_pool's cells exactly: pixel value 20 (c + 1) + item -> class c, 0 -> EMPTY."""

    def forward(self, x):
        value = ((x + 1) * 127.5).round().mean(dim=(1, 2, 3))
        label = torch.where(value < 10, EMPTY, (value // 20 - 1).long().clamp(0, 9))
        return torch.nn.functional.one_hot(label, EMPTY + 1).float()


def scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [draw_scene(rng) for _ in range(n)]


def test_split_cells_follows_the_reading_order():
    canvas = render_scene(Scene((1, 2, 3, 4)), flat_pool(1), np.random.default_rng(0))[None]
    cells = split_cells(canvas)
    assert cells.shape == (1, 4, 1, 28, 28)
    for i, (row, col) in enumerate(CELLS):
        assert torch.equal(cells[0, i], canvas[0, :, row * 28 : row * 28 + 28, col * 28 : col * 28 + 28])
        assert cells[0, i].unique().tolist() == [20 * (i + 2)]
    with pytest.raises(ValueError, match="56, 56"):
        split_cells(torch.zeros(1, 1, 28, 28))


def test_prompt_following_counts_whole_scenes_by_number_of_objects():
    sc = [Scene((1, None, None, None)), Scene((1, 2, None, None)), Scene((1, 2, 3, None)), Scene((1, 2, 3, 4))]
    truth = scene_labels(sc)
    perfect = prompt_following(truth, sc)
    assert perfect.accuracy == perfect.cell_accuracy == 1.0
    assert perfect.by_objects == {"1": 1.0, "2": 1.0, "3-4": 1.0} and perfect.counts == {"1": 1, "2": 1, "3-4": 2}
    wrong = truth.clone()
    wrong[0, 3] = 5  # an object where the prompt wants an empty cell
    wrong[2, 0] = -1  # a named object missing
    score = prompt_following(wrong, sc)
    assert score.accuracy == 0.5 and score.cell_accuracy == 14 / 16
    assert score.by_objects == {"1": 0.0, "2": 1.0, "3-4": 0.5}
    assert score.layout == 0.5 and score.class_where_occupied == 1.0 and math.isnan(score.misplaced)
    swapped = truth.clone()
    swapped[1, :2] = torch.tensor([2, 1])  # both objects drawn, in each other's cells
    swapped[3, 3] = 7  # a class the prompt names nowhere
    binding = prompt_following(swapped, sc)
    assert binding.layout == 1.0 and binding.class_where_occupied == 7 / 10 and binding.misplaced == 2 / 3
    assert "layout right (g): 1.000; named class where the named cell holds an object: 0.700" in binding.lines("g")[2]
    only_two = prompt_following(truth[1:2], sc[1:2])
    assert only_two.by_objects == {"2": 1.0} and "2 objects: 1.000 of 1" in only_two.lines("real")[0]
    with pytest.raises(ValueError, match=r"\(N, 4\) for 4 scenes"):
        prompt_following(truth[:3], sc)


def test_predict_cells_reads_real_scenes_laid_out_per_the_prompts():
    sc = scenes(64)
    images = real_scenes(sc, pool=flat_pool(), seed=1)
    assert images.shape == (64, 1, 56, 56)
    assert torch.equal(real_scenes(sc, pool=flat_pool(), seed=1), images)
    predicted = predict_cells(FlatReader(), images, batch_size=50)
    assert torch.equal(predicted, scene_labels(sc))
    assert prompt_following(predicted, sc).accuracy == 1.0


def bar_items(per_class: int = 20, seed: int = 0) -> ImageDataset:
    """Toy items: class c is a bright horizontal bar at rows 2c+3..2c+5, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.randint(0, 40, (len(labels), 1, 28, 28), generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, 0, 2 * c + 3 : 2 * c + 6, 4:24] = 220
    return ImageDataset(images.to(torch.uint8), labels, list(CLASS_NAMES))


def test_the_cell_classifier_learns_toy_items_and_blank_cells():
    items = bar_items()
    model = CellClassifier.train_on(items, steps=200, batch_size=32, lr=1e-2, channels=(8, 16, 16))
    assert not model.training
    sc = scenes(40, seed=3)
    predicted = predict_cells(model, real_scenes(sc, pool=bar_items(seed=1)))
    assert prompt_following(predicted, sc).cell_accuracy > 0.95
    noisy_blank = to_model(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)) + 0.05 * torch.randn(8, 1, 28, 28)
    assert (model(noisy_blank).argmax(-1) == EMPTY).all()
    with pytest.raises(ValueError, match="labelled"):
        CellClassifier.train_on(ImageDataset(items.images, torch.full_like(items.labels, -1), []), steps=1)
