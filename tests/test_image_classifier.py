"""The judge of class-conditional image samples (unnoise.modalities.image.classifier)."""

import pytest

from unnoise.modalities.image.classifier import ClassAccuracy, PixelClassifier, class_accuracy
from unnoise.modalities.image.pipeline import dataset
from unnoise.training.config import TrainConfig


def test_judge_reads_held_out_digits():
    """Fit on the digits' training split, it must read the unseen test split nearly perfectly
    (an RBF SVM on these 8x8 digits is a textbook ~99% classifier), so that the demo's sample
    accuracy measures the generator, not the judge."""
    cfg = TrainConfig(data="digits")
    train, test = dataset(cfg, "train"), dataset(cfg, "test")
    judge = PixelClassifier().fit(train.images, train.labels)
    assert (judge.predict(test.images) == test.labels).double().mean() >= 0.98


def test_judge_subsamples_beyond_max_fit_and_refuses_bad_input():
    cfg = TrainConfig(data="digits")
    train = dataset(cfg, "train")
    judge = PixelClassifier(max_fit=200).fit(train.images, train.labels)
    assert judge._svm.support_vectors_.shape[0] <= 200
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(train.images.float())
    with pytest.raises(RuntimeError, match="fit"):
        PixelClassifier().predict(train.images)


def test_worst_class_and_line():
    acc = ClassAccuracy(samples=0.9, real=0.99, per_class={"0": 1.0, "1": 0.8}, n=10)
    assert acc.worst == ("1", 0.8)
    assert "90.0%" in acc.line() and "worst class 1: 80%" in acc.line()


def test_class_accuracy_refuses_unconditional_runs():
    class Config:
        num_classes = None

    class FakeRun:
        model = type("M", (), {"config": Config()})()

    with pytest.raises(ValueError, match="class-conditional"):
        class_accuracy(FakeRun(), n=10)
