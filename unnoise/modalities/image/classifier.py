"""Class accuracy of class-conditional samples: does a sample drawn for class c look like a c?

The judge is a support-vector machine (RBF kernel, scikit-learn) on the pixels, fit on the run's
training split (at most ``MAX_FIT`` images, a seeded subset beyond that). It is scored twice: on
the real test split, which the diffusion model never saw (the judge's own accuracy, the ceiling a
perfect generator reaches), and on the samples, each against the class it was drawn for. The
two figures side by side say how much of the samples' error is the generator's and how much the
judge's. This is "GAN-test" of Shmelkov et al. (2018, "How good is my GAN?"): a classifier fit on
real images, scored on generated ones; it rewards samples that look like their class (fidelity),
not diversity, so it is reported beside the bound and FID, never instead of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from unnoise.modalities.image.pipeline import class_names, dataset, sample_images_sharded
from unnoise.modalities.run import Run

__all__ = ["ClassAccuracy", "PixelClassifier", "class_accuracy"]

MAX_FIT = 10_000  # an RBF SVM fits 10k 28x28 images in about a minute on one core; digits' 1,437 in 0.2 s


class PixelClassifier:
    """An RBF-kernel SVM on pixels scaled to [0, 1]: ``fit(images, labels)``, ``predict(images)``.

    Images are uint8 ``(N, C, H, W)``; labels long ``(N,)``.
    """

    def __init__(self, *, max_fit: int = MAX_FIT, seed: int = 0):
        self.max_fit, self.seed = max_fit, seed
        self._svm = None

    @staticmethod
    def _features(images: Tensor) -> np.ndarray:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"the classifier takes uint8 (N, C, H, W) images; got {images.dtype} {tuple(images.shape)}"
            )
        return images.flatten(1).numpy().astype(np.float32) / 255.0

    def fit(self, images: Tensor, labels: Tensor) -> PixelClassifier:
        from sklearn.svm import SVC

        if len(labels) > self.max_fit:
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))[: self.max_fit]
            images, labels = images[keep], labels[keep]
        self._svm = SVC(kernel="rbf", gamma="scale", C=10.0).fit(self._features(images), labels.numpy())
        return self

    def predict(self, images: Tensor) -> Tensor:
        if self._svm is None:
            raise RuntimeError("fit the classifier before predict")
        return torch.from_numpy(self._svm.predict(self._features(images))).long()


@dataclass(frozen=True)
class ClassAccuracy:
    """``samples``: the fraction of samples the judge reads as the class they were drawn for;
    ``real``: the judge's accuracy on the real test split; ``per_class``: the samples' accuracy
    per class (``worst`` is its minimum); ``n``: how many samples."""

    samples: float
    real: float
    per_class: dict[str, float]
    n: int

    @property
    def worst(self) -> tuple[str, float]:
        name = min(self.per_class, key=self.per_class.__getitem__)
        return name, self.per_class[name]

    def line(self) -> str:
        name, acc = self.worst
        return (
            f"class accuracy of {self.n} guided samples: {self.samples:.1%} (worst class {name}: {acc:.0%}); "
            f"the judge (RBF SVM fit on the training split) on real test images: {self.real:.1%}"
        )


def class_accuracy(run: Run, *, n: int = 500, **sampling) -> ClassAccuracy:
    """Score ``n`` class-balanced samples of a class-conditional run (``sampling``: sampler, nfe,
    guidance, grid, seed, ...) with a :class:`PixelClassifier` fit on the run's training split."""
    k = run.model.config.num_classes
    if k is None:
        raise ValueError("class accuracy needs a class-conditional run; this one is unconditional")
    if "class_id" in sampling:
        raise ValueError("class accuracy draws every class in turn; it takes no class_id")
    train, test = dataset(run.cfg, "train"), dataset(run.cfg, "test")
    judge = PixelClassifier().fit(train.images, train.labels)
    real = (judge.predict(test.images) == test.labels).double().mean().item()
    images, labels = sample_images_sharded(run, n=n, **sampling)
    hit = judge.predict(images) == labels
    names = class_names(run)
    per_class = {names[c]: hit[labels == c].double().mean().item() for c in range(k) if (labels == c).any()}
    return ClassAccuracy(hit.double().mean().item(), real, per_class, n)
