"""The Modality interface: what a kind of data provides so that train, sample, eval and demo work on it.

A modality is a dataset of tensors, a network factory, how a batch enters the network (encode),
how a sample leaves it (write), its metrics and its demo. Everything else (the objectives, the
trainer, the samplers, guidance, the CLI's dispatch) is written once, in :mod:`unnoise.modalities.run`
and :mod:`unnoise.cli`. A new modality is one subpackage (data.py, pipeline.py, metrics.py, io.py,
demo.py) with a ``modality.py`` whose ``MODALITY`` implements this protocol, plus one line in
:data:`REGISTRY`; nothing in the package imports a modality.py but :func:`get_modality`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from unnoise.training.objectives import Encoded, Net

# name -> the module whose MODALITY implements it (imported only when that modality is used)
REGISTRY: dict[str, str] = {
    "image": "unnoise.modalities.image.modality",
    "text": "unnoise.modalities.text.modality",
    "audio": "unnoise.modalities.audio.modality",
    "toy": "unnoise.modalities.toy.modality",
    "text2image": "unnoise.modalities.text2image.modality",
}


@dataclass
class TrainingData:
    """What the trainer batches: ``x`` (N, ...) as stored (pixels in [-1, 1], token ids, waveforms),
    ``cond`` (N,) labels or (N, K) condition ids (None: unconditional), and the ``null`` condition
    (one label or one row) that classifier-free guidance trains with."""

    x: Tensor
    cond: Tensor | None = None
    null: Tensor | None = None


class Modality(Protocol):
    name: str
    defaults: Mapping[str, Any]  # training settings it starts from (flags and --config win)
    ddpm_defaults: Mapping[str, Any]  # ... and those under objective="ddpm" (its schedule, T, prediction)
    default_sampler: str
    sample_options: tuple[str, ...]  # the `unnoise sample` options it takes besides sampler, nfe, n, seed, out
    eval_options: tuple[str, ...]  # the `unnoise eval` options it takes besides sampler, nfe, seed
    sharded: bool  # whether sample/eval deal their work to the processes of a torchrun group
    run_type: type  # the Run subclass a loaded run is (with the modality's conveniences)

    def check(self, cfg: Any) -> None:
        """Refuse, in one line, a setting this modality cannot honour (ValueError)."""

    def training_data(self, cfg: Any) -> TrainingData:
        """The training split; records in ``cfg.extra`` what loading a run needs (class names, vocabulary)."""

    def build(self, cfg: Any, data: TrainingData) -> nn.Module:
        """A fresh trainable model; records its architecture in ``cfg.extra`` (or returns one with ``.config``)."""

    def load(self, config: dict[str, Any], cfg: Any) -> nn.Module:
        """The same model, untrained, from a run's saved config.json (``config``) and settings (``cfg``)."""

    def network(self, model: nn.Module) -> Net:
        """The denoising network of the model, as ``net(x, t or c_noise, cond)``."""

    def encode(self, model: nn.Module, x: Tensor) -> Encoded:
        """How a batch of ``TrainingData.x`` enters the diffusion."""

    def preview(self, run_dir: Path, cfg: Any, model: nn.Module, step: int) -> None:
        """What to write at each checkpoint (image runs: a grid of samples); may do nothing."""

    def sample(self, run: Any, **options: Any) -> Any:
        """Generate from a loaded run (:class:`unnoise.modalities.run.Run`)."""

    def sample_shape(self, run: Any) -> tuple[int, ...]:
        """The shape of one sample in the diffusion's space (what sampling holds in memory per sample)."""

    def outputs(self, out: Path) -> list[Path]:
        """The files ``write`` would create for ``out`` (those of them that exist, where names vary)."""

    def write(self, run: Any, samples: Any, out: Path, **options: Any) -> list[Path]:
        """Write samples next to ``out`` (PNG / NPZ, TXT, WAV); returns the files written."""

    def evaluate(self, run: Any, **options: Any) -> list[str]:
        """The modality's metrics of a run, as lines to print."""

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        """Train a small model on built-in data and write what it does into ``out``."""


def get_modality(name: str) -> Modality:
    """The registered modality ``name``; one line naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown modality {name!r}; allowed: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).MODALITY


def modality_of(config: dict[str, Any]) -> str:
    """The modality of a run's config.json (image runs of earlier versions did not record it)."""
    train = config.get("train", {}) if isinstance(config, dict) else {}
    extra = train.get("extra", {}) if isinstance(train, dict) else {}
    return extra.get("modality", "image") if isinstance(extra, dict) else "image"


def output_stem(out: Path, suffixes: tuple[str, ...]) -> Path:
    """``out`` without one of the suffixes a modality writes (FILE.png and FILE -> FILE)."""
    return out.with_suffix("") if out.suffix in suffixes else out
