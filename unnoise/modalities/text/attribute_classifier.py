"""The attribute classifier that steers text sampling: p(c | x_sigma) on noisy embeddings, its training, save, load.

Diffusion-LM (Li et al. 2022, Sec. 5.1) steers sampling with a classifier on the *noisy* latents.
:class:`AttributeClassifier` reads ``x = EMB(w) + sigma n`` ``(B, L, E)`` (the space the run's
denoiser sees) and ``sigma`` ``(B,)`` and gives, per E2E field (food, area, ...), logits over that
field's values plus ``"absent"`` (class 0). :func:`train_control` fits it on a run's training
sentences and MRs with the run's frozen embedding and noise levels, and saves it in ``RUN/control``;
:mod:`unnoise.modalities.text.control` guides sampling with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.diffusion import expand
from unnoise.modalities.text.control_metrics import ABSENT, CONTROL_FIELDS
from unnoise.modalities.text.diffusion_lm import WordEmbedding
from unnoise.modalities.text.pipeline import load_text_run, text_data
from unnoise.nets.layers import timestep_embedding
from unnoise.nets.transformer import Block
from unnoise.schedules import DiscreteSchedule
from unnoise.schema import from_dict
from unnoise.training.checkpoint import load_module, read_module_meta, save_module

__all__ = [
    "AttributeClassifier",
    "ClassifierConfig",
    "classifier_accuracy",
    "field_values",
    "load_classifier",
    "save_classifier",
    "train_classifier",
    "train_control",
]

# ---- the classifier on noisy embeddings -------------------------------------------------------------


@dataclass
class ClassifierConfig:
    embed_dim: int  # E: the run's embedding size
    seq_len: int  # L: the run's sequence length (learned positions)
    fields: dict[str, list[str]]  # field -> its values; value i is class i + 1, class 0 is ABSENT
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if min(self.embed_dim, self.seq_len, self.width, self.depth, self.heads, self.mlp_ratio) < 1:
            raise ValueError(f"embed_dim, seq_len, width, depth, heads and mlp_ratio must be >= 1, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} does not split into heads={self.heads} attention heads")
        if not self.fields or any(not v or len(set(v)) != len(v) or ABSENT in v for v in self.fields.values()):
            raise ValueError(f"fields must map each field to distinct values (not {ABSENT!r}), got {self.fields}")


def field_values(mrs: Sequence[Mapping[str, str]], fields: Sequence[str] = CONTROL_FIELDS) -> dict[str, list[str]]:
    """Each field's values seen in ``mrs``, sorted; fields never seen are left out."""
    seen = {f: sorted({mr[f] for mr in mrs if f in mr}) for f in fields}
    return {f: v for f, v in seen.items() if v}


class AttributeClassifier(nn.Module):
    """p(c_f | x, sigma) for each field f: x ``(B, L, E)`` = EMB(w) + sigma n, sigma ``()``/``(B,)`` -> logits.

    x -> x / sqrt(1 + sigma^2) (the VP input scaling the run's denoiser applies, so inputs have unit
    scale at every noise level) -> Linear(E, width) + position + MLP(sinusoid(100 log sigma))
    -> pre-LN transformer blocks (unnoise.nets.transformer.Block, no mask) -> LayerNorm -> mean over
    positions -> one Linear head per field, ``(B, 1 + #values)`` (class 0: absent).
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        self.in_proj = nn.Linear(c.embed_dim, c.width)
        self.pos = nn.Parameter(0.02 * torch.randn(c.seq_len, c.width))
        self.sigma_embed = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, 0.0) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.ModuleList(nn.Linear(c.width, 1 + len(v)) for v in c.fields.values())
        self.metrics: dict[str, Any] = {}  # what train_control measured (held-out accuracy), set on load

    @property
    def fields(self) -> list[str]:
        return list(self.config.fields)

    def forward(self, x: Tensor, sigma: Tensor | float) -> dict[str, Tensor]:
        c = self.config
        if x.ndim != 3 or not 1 <= x.shape[1] <= c.seq_len or x.shape[2] != c.embed_dim:
            raise ValueError(f"x must have shape (B, L <= {c.seq_len}, {c.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
        # log sigma spans about -2..8 over a run's schedule; x100 spreads it like DDPM step indices.
        noise = self.sigma_embed(timestep_embedding(100 * sigma.clamp_min(1e-4).log(), c.width).to(x.dtype))
        h = self.in_proj(x / (1 + sigma**2).sqrt()[:, None, None]) + self.pos[:L] + noise[:, None]
        for block in self.blocks:
            h = block(h, None)
        pooled = self.norm(h).mean(1)  # (B, width)
        return {f: head(pooled) for f, head in zip(c.fields, self.out, strict=True)}

    def targets(self, control: Mapping[str, str]) -> dict[str, int]:
        """``{"food": "Chinese"}`` -> ``{"food": class index}``; unknown field or value -> ValueError."""
        if not control:
            raise ValueError(
                f"control is empty: give at least one field, e.g. {{'food': 'Chinese'}}; allowed fields: "
                f"{', '.join(self.fields)}"
            )
        out = {}
        for f, v in control.items():
            if f not in self.config.fields:
                raise ValueError(f"unknown control field {f!r}; allowed: {', '.join(self.fields)}")
            if v not in self.config.fields[f]:
                raise ValueError(f"unknown value {v!r} for {f}; allowed: {', '.join(self.config.fields[f])}")
            out[f] = 1 + self.config.fields[f].index(v)
        return out

    def log_prob(self, x: Tensor, sigma: Tensor | float, targets: Mapping[str, int]) -> Tensor:
        """log p(c | x, sigma) = sum_f log softmax(logits_f)[c_f], fields independent given x; -> (B,)."""
        logits = self(x, sigma)
        return sum(F.log_softmax(logits[f], -1)[:, i] for f, i in targets.items())

    def labels(self, mrs: Sequence[Mapping[str, str]]) -> Tensor:
        """MRs -> class indices ``(N, #fields)`` long (0 where the MR lacks the field; unseen values -> 0 too)."""
        index = [{v: i + 1 for i, v in enumerate(vals)} for vals in self.config.fields.values()]
        return torch.tensor(
            [[ix.get(mr.get(f, ""), 0) for f, ix in zip(self.fields, index, strict=True)] for mr in mrs]
        )


def train_classifier(
    classifier: AttributeClassifier,
    embedding: WordEmbedding,
    ids: Tensor,
    labels: Tensor,
    schedule: DiscreteSchedule,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Fit p(c | x_sigma) by cross-entropy summed over fields, at the run's noise levels; returns the losses.

    Each step draws a batch of sentences (ids ``(N, L)``, labels ``(N, #fields)``), ``t ~ U{1..T}``
    (as the run's objective), ``sigma = schedule.sigma(t)`` and ``x = EMB(w) + sigma n`` with the run's
    frozen ``embedding``. Every draw comes from one generator seeded with ``seed``: deterministic.
    """
    if ids.ndim != 2 or labels.shape != (ids.shape[0], len(classifier.fields)):
        raise ValueError(
            f"need ids (N, L) and labels (N, {len(classifier.fields)}), got {tuple(ids.shape)}, {tuple(labels.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = embedding.embed(ids).float()  # (N, L, E), frozen: computed once
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.01)
    classifier.train()
    losses = []
    for _ in range(steps):
        i = torch.randint(len(ids), (batch_size,), generator=g)
        sigma = schedule.sigma(torch.randint(1, schedule.T + 1, (batch_size,), generator=g)).float()
        x = x0[i] + expand(sigma, x0[i]) * torch.randn(x0[i].shape, generator=g)
        logits = classifier(x, sigma)
        loss = sum(F.cross_entropy(logits[f], labels[i, j]) for j, f in enumerate(classifier.fields))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def classifier_accuracy(classifier: AttributeClassifier, x0: Tensor, labels: Tensor, sigma: float) -> dict[str, float]:
    """Per-field accuracy at a fixed noise level with fixed noise (seed 0); x0 ``(N, L, E)``."""
    g = torch.Generator().manual_seed(0)
    classifier.eval()
    logits = classifier(x0 + sigma * torch.randn(x0.shape, generator=g), torch.tensor(float(sigma)))
    return {f: (logits[f].argmax(-1) == labels[:, j]).float().mean().item() for j, f in enumerate(classifier.fields)}


def train_control(
    run_dir: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    fields: Sequence[str] = CONTROL_FIELDS,
    seed: int = 0,
) -> AttributeClassifier:
    """Train the attribute classifier for a text run on its training sentences and MRs; save it in RUN/control.

    Saved metrics: held-out per-field accuracy at sigma_min and at sigma = 1 (the held-out MRs of the run).
    """
    run = load_text_run(run_dir)
    text, mrs = text_data(run.cfg, "train")
    if mrs is None:
        raise ValueError(f"{run_dir} was not trained on E2E (data={run.cfg.data!r}): attribute control needs MRs")
    config = ClassifierConfig(run.model.embedding.dim, run.seq_len, field_values(mrs, fields), width, depth, heads)
    with torch.random.fork_rng(devices=[]):  # the initialisation depends on seed, not on the global stream
        torch.manual_seed(seed)
        classifier = AttributeClassifier(config)
    emb = run.model.embedding
    ids = run.tokenizer.encode_batch(text, run.seq_len)
    losses = train_classifier(
        classifier, emb, ids, classifier.labels(mrs), run.schedule, steps=steps, batch_size=batch_size, lr=lr, seed=seed
    )
    held_text, held_mrs = text_data(run.cfg, "held_out")
    x0 = emb.embed(run.tokenizer.encode_batch(held_text, run.seq_len)).detach().float()
    y = classifier.labels(held_mrs)
    metrics = {
        "steps": steps, "seed": seed, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "held_out_accuracy_sigma_min": classifier_accuracy(classifier, x0, y, run.schedule.sigma_min),
        "held_out_accuracy_sigma_1": classifier_accuracy(classifier, x0, y, 1.0),
    }  # fmt: skip
    save_classifier(classifier, run_dir, metrics)
    return classifier.eval()


def save_classifier(
    classifier: AttributeClassifier, run_dir: str | Path, metrics: Mapping[str, Any] | None = None
) -> Path:
    """Write RUN/control/{weights.safetensors, meta.json} atomically (``checkpoint.save_module``)."""
    meta = {"format": 1, "config": asdict(classifier.config), "metrics": dict(metrics or {})}
    return save_module(Path(run_dir) / "control", classifier, meta)


def load_classifier(run_dir: str | Path) -> AttributeClassifier:
    """The classifier saved by :func:`save_classifier` (eval mode; ``.metrics`` holds its saved metrics)."""
    folder = Path(run_dir) / "control"
    try:
        meta = read_module_meta(folder)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no attribute classifier in {folder}: train one first (train_control({str(run_dir)!r}))"
        ) from None
    try:
        with torch.random.fork_rng(devices=[]):  # the weights are overwritten: leave the global stream alone
            classifier = AttributeClassifier(from_dict(ClassifierConfig, meta["config"], str(folder / "meta.json")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'meta.json'} is not a classifier config written by save_classifier: {e}") from None
    load_module(folder, classifier)  # checks names and shapes; no pickle
    classifier.metrics = meta.get("metrics", {})
    return classifier.eval()
