"""A modality written only here, for tests/test_modality.py: 1-D Gaussian data N(0.5, 0.2^2) in 4 dimensions.

It is the whole of what a new modality writes: its data, network, encoding, sampling, writer,
metric and demo, with nothing added to the trainer, the samplers or the CLI.
"""

from pathlib import Path

import torch
from torch import nn

from unnoise.modalities.base import TrainingData
from unnoise.modalities.run import Run
from unnoise.nets.mlp import ResidualMLP
from unnoise.sampling.front import sample
from unnoise.training.objectives import Encoded

MU, S, D = 0.5, 0.2, 4


class GaussModality:
    name = "gauss"
    defaults = {"data": "gauss", "model": "tiny", "batch_size": 64}
    ddpm_defaults = {"schedule": "linear", "T": 100}
    default_sampler = "heun"
    sample_options = ("grid",)
    eval_options = ("n",)
    sharded = False
    run_type = Run

    def check(self, cfg) -> None:
        if cfg.loss in ("hybrid", "vlb"):
            raise ValueError("gauss runs do not learn the variance")

    def training_data(self, cfg) -> TrainingData:
        return TrainingData(MU + S * torch.randn(512, D, generator=torch.Generator().manual_seed(cfg.seed)))

    def build(self, cfg, data) -> nn.Module:
        return ResidualMLP(dim=D, hidden=16, depth=1, emb_dim=8)

    def load(self, config, cfg) -> nn.Module:
        return self.build(cfg, None)

    def network(self, model):
        return lambda x, t, cond: model(x, t)

    def encode(self, model, x) -> Encoded:
        return Encoded(x, self.network(model))

    def preview(self, run_dir, cfg, model, step) -> None:
        pass

    def sample(self, run: Run, *, n: int, sampler: str, nfe: int, seed: int, **options):
        x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * run.sigma_max
        D_ = run.denoiser(None, None)
        return sample(D_, x, sampler=sampler, nfe=nfe, sigma_max=run.sigma_max, sigma_min=run.sigma_min, **options)

    def sample_shape(self, run) -> tuple[int, ...]:
        return (D,)

    def outputs(self, out: Path) -> list[Path]:
        return [out.with_suffix(".txt")]

    def write(self, run, samples, out: Path, **options) -> list[Path]:
        path = self.outputs(out)[0]
        path.write_text("\n".join(" ".join(f"{v:.4f}" for v in row) for row in samples.tolist()) + "\n")
        return [path]

    def evaluate(self, run, *, n=None, sampler, nfe, seed, **options) -> list[str]:
        x = self.sample(run, n=n or 256, sampler=sampler, nfe=nfe, seed=seed)
        return [f"sample mean {x.mean().item():.3f} (data {MU}), std {x.std().item():.3f} (data {S})"]

    def demo(self, out, *, steps=None, seed=0):
        return {}


MODALITY = GaussModality()
