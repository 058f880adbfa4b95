"""The text modality: Diffusion-LM (Li et al. 2022), diffusion on word embeddings learned jointly.

A batch of token ids enters the diffusion as its embeddings EMB(w) (B, L, E); the modality adds
Diffusion-LM's rounding term -log p(w | x0) to whichever diffusion loss the run trains (its
t = 1 embedding term is the diffusion loss's own squared error at t = 1). Data: :mod:`.data`;
network: :class:`unnoise.nets.transformer.TextTransformer`; sampling (clamping, infilling,
data-to-text): :mod:`.pipeline`; attribute control: :mod:`.control`; metrics: :mod:`.metrics`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.modalities.base import TrainingData
from unnoise.modalities.text.control import sample_controlled
from unnoise.modalities.text.data import E2E_ATTRIBUTES, Tokenizer, tokenize
from unnoise.modalities.text.demo import run_text_demo
from unnoise.modalities.text.io import save_sentences
from unnoise.modalities.text.metrics import evaluate_lines
from unnoise.modalities.text.pipeline import DiffusionLM, TextRun, encode_mrs, mr_tokens, sample_text, text_data
from unnoise.nets.transformer import TransformerConfig
from unnoise.schema import from_dict
from unnoise.training.config import TrainConfig
from unnoise.training.objectives import Encoded


def sample_with_control(
    run: TextRun, control: list[str], scale: float, *, template: str | None = None, mr: str | None = None, **options
) -> list[str]:
    """``--control FIELD=VALUE ...``: unconditional generation steered by the attribute classifier;
    with ``guidance`` (not 1), also classifier-free guided on the control as a partial MR."""
    if template is not None or mr is not None:
        raise ValueError("--control steers unconditional generation; it does not combine with --template or --mr")
    fields = {}
    for item in control:
        field, sep, value = item.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise ValueError(f"--control takes FIELD=VALUE (e.g. food=Chinese), got {item!r}")
        fields[field.strip()] = value.strip()
    guidance = options.pop("guidance", 1.0)
    other = sorted(set(options) - {"n", "sampler", "nfe", "seed"})
    if other:
        raise ValueError(f"--control does not combine with {', '.join('--' + k for k in other)}")
    return sample_controlled(run, fields, guidance=guidance if guidance != 1.0 else None, scale=scale, **options)


class TextModality:
    """Text: see the module docstring."""

    name = "text"
    defaults: dict[str, Any] = {"data": "tiny", "model": "small", "lr": 5e-4}
    ddpm_defaults: dict[str, Any] = {"schedule": "sqrt", "prediction": "x0"}  # Diffusion-LM's choices
    default_sampler = "dpmpp_2m_sde"
    sample_options = ("template", "mr", "guidance", "control", "control_scale", "eta", "grid")
    eval_options = ("bpd", "n", "guidance")
    sharded = False  # sample/eval dealt to the processes of a torchrun group
    run_type = TextRun

    def check(self, cfg: TrainConfig) -> None:
        if cfg.loss in ("hybrid", "vlb"):
            raise ValueError(
                f"text runs do not learn the reverse variance (the transformer outputs one value per embedding "
                f"dimension), so loss {cfg.loss!r} is refused; allowed: simple, min_snr"
            )
        if cfg.image_size is not None:
            raise ValueError("--image-size applies to image runs")

    def training_data(self, cfg: TrainConfig) -> TrainingData:
        text, mrs = text_data(cfg, "train")
        tokenizer = Tokenizer.build(text)
        seq_len = int(cfg.extra.get("seq_len", 2 + max(len(tokenize(s)) for s in text)))
        conditional = cfg.conditional and mrs is not None
        vocab = sorted({tok for mr in mrs for tok in mr_tokens(mr)}) if conditional else []
        cfg.extra |= {"tokenizer": tokenizer.to_json(), "seq_len": seq_len, "mr_vocab": vocab}
        ids = tokenizer.encode_batch(text, seq_len)
        if not conditional:
            return TrainingData(ids)
        return TrainingData(ids, encode_mrs(mrs, vocab), torch.zeros(len(E2E_ATTRIBUTES), dtype=torch.long))

    def build(self, cfg: TrainConfig, data: TrainingData) -> DiffusionLM:
        conditional = data.cond is not None
        config = TransformerConfig.preset(
            cfg.model,
            int(cfg.extra["seq_len"]),
            int(cfg.extra.get("embed_dim", 16)),
            cond_vocab=len(cfg.extra["mr_vocab"]) + 1 if conditional else None,
            cond_len=len(E2E_ATTRIBUTES) if conditional else 0,
        )
        config = dataclasses.replace(config, **cfg.extra.get("net", {}))  # e.g. {"width": 128, "depth": 6}
        cfg.extra["transformer"] = dataclasses.asdict(config)
        return DiffusionLM(config, Tokenizer.from_json(cfg.extra["tokenizer"]).vocab_size)

    def load(self, config: dict[str, Any], cfg: TrainConfig) -> DiffusionLM:
        tokenizer = Tokenizer.from_json(cfg.extra["tokenizer"])
        config = from_dict(TransformerConfig, cfg.extra["transformer"], "config.json 'extra.transformer'")
        return DiffusionLM(config, tokenizer.vocab_size)

    def network(self, model: DiffusionLM):
        return model.net

    def encode(self, model: DiffusionLM, x: Tensor) -> Encoded:
        x0 = model.embedding.embed(x)  # EMB(w) (B, L, E): gradients reach the embedding table
        # L_round = -log p(w | x0), mean over all positions, pads included (Li et al. 2022, Sec. 4.1;
        # the reference code): without it the joint objective collapses every embedding onto one point.
        logits = model.embedding.logits(x0)
        rounding = nn.functional.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none").mean(1)
        return Encoded(x0, model.net, rounding)

    def preview(self, run_dir: Path, cfg: TrainConfig, model: DiffusionLM, step: int) -> None:
        pass

    def sample(self, run: TextRun, *, control: list[str] | None = None, control_scale: float | None = None, **options):
        if control:
            return sample_with_control(run, control, 3.0 if control_scale is None else control_scale, **options)
        return sample_text(run, **options)

    def sample_shape(self, run: TextRun) -> tuple[int, ...]:
        return (run.seq_len, int(run.cfg.extra["transformer"]["embed_dim"]))

    def outputs(self, out: Path) -> list[Path]:
        return [out if out.suffix in (".txt", ".jsonl") else out.with_name(out.name + ".txt")]

    def write(self, run: TextRun, samples: list[str], out: Path, **options) -> list[Path]:
        return [save_sentences(self.outputs(out)[0], samples)]

    def evaluate(self, run: TextRun, **options) -> list[str]:
        return evaluate_lines(run, **options)

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        return run_text_demo(out, steps=steps, seed=seed)


MODALITY = TextModality()
