"""The 2-D toy modality: a residual MLP on a Gaussian mixture whose density is known exactly.

Data and sampling: :mod:`.pipeline` (:mod:`.data` holds the mixtures and their exact denoisers);
writers (scatter PNG, NPZ): :mod:`.io`; metrics against the closed form: :mod:`.metrics`; demo (the
DiffusionModel facade with learned variance and iDDPM's hybrid loss): :mod:`.demo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from unnoise.modalities.base import TrainingData, output_stem
from unnoise.modalities.run import Run
from unnoise.modalities.toy.demo import DemoConfig, run_demo
from unnoise.modalities.toy.io import save_points, save_points_npz
from unnoise.modalities.toy.metrics import evaluate_toy
from unnoise.modalities.toy.pipeline import points, sample_points
from unnoise.nets.mlp import ResidualMLP
from unnoise.training.config import TrainConfig
from unnoise.training.objectives import Encoded

MLP_PRESETS = {"tiny": dict(hidden=32, depth=2, emb_dim=16), "small": dict(hidden=128, depth=3, emb_dim=64)}


class ToyModality:
    """2-D points: see the module docstring."""

    name = "toy"
    defaults: dict[str, Any] = {"data": "ring", "model": "small", "batch_size": 512, "lr": 2e-3}
    ddpm_defaults: dict[str, Any] = {"schedule": "linear"}
    default_sampler = "dpmpp_2m"
    sample_options = ("eta", "grid")
    eval_options = ("n",)
    sharded = False  # sample/eval dealt to the processes of a torchrun group
    run_type = Run

    def check(self, cfg: TrainConfig) -> None:
        if cfg.model not in MLP_PRESETS:
            raise ValueError(f"unknown toy network {cfg.model!r}; allowed: {', '.join(MLP_PRESETS)}")
        if cfg.image_size is not None:
            raise ValueError("--image-size applies to image runs")

    def training_data(self, cfg: TrainConfig) -> TrainingData:
        return TrainingData(points(cfg, "train"))  # unlabelled: the mixture's components are not classes

    def build(self, cfg: TrainConfig, data: TrainingData) -> nn.Module:
        size = MLP_PRESETS[cfg.model] | {"dim": 2, "out_dim": 4 if cfg.learned_variance else 2}
        cfg.extra["mlp"] = size
        return ResidualMLP(**size)

    def load(self, config: dict[str, Any], cfg: TrainConfig) -> nn.Module:
        return ResidualMLP(**cfg.extra["mlp"])

    def network(self, model: nn.Module):
        return lambda x, t, cond: model(x, t)

    def encode(self, model: nn.Module, x: Tensor) -> Encoded:
        return Encoded(x, self.network(model))

    def preview(self, run_dir: Path, cfg: TrainConfig, model: nn.Module, step: int) -> None:
        pass

    def sample(self, run: Run, **options) -> Tensor:
        return sample_points(run, **options)

    def sample_shape(self, run: Run) -> tuple[int, ...]:
        return (2,)

    def outputs(self, out: Path) -> list[Path]:
        stem = output_stem(out, (".png", ".npz"))
        return [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")]

    def write(self, run: Run, samples: Tensor, out: Path, **options) -> list[Path]:
        out = output_stem(out, (".png", ".npz"))
        png = save_points(out.with_name(out.name + ".png"), samples, points(run.cfg, "test"))
        return [png, save_points_npz(out.with_name(out.name + ".npz"), samples)]

    def evaluate(self, run: Run, **options) -> list[str]:
        return evaluate_toy(run, **options)

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        kw = {} if steps is None else {"steps": steps}
        return run_demo(DemoConfig(seed=seed, out=out, **kw))


MODALITY = ToyModality()
