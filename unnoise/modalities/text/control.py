"""Controllable generation on E2E by classifier guidance on attributes (Li et al. 2022, Sec. 5.1).

Diffusion-LM keeps the language model frozen and steers sampling with a classifier ``p(c | x_t)``
on the *noisy* latents: at each denoising step the latent is moved by a few gradient steps on
``lambda log p(x_{t-1} | x_t) + log p(c | x_{t-1})`` (control term plus a fluency term that keeps the
latent near what the diffusion model predicts). Here, in sigma-space (DESIGN.md):

- :class:`AttributeClassifier` reads ``x = EMB(w) + sigma n`` ``(B, L, E)`` (the space the run's
  denoiser sees) and ``sigma`` ``(B,)`` and gives, per E2E field (food, area, ...), logits over that
  field's values plus ``"absent"`` (class 0). :func:`train_control` fits it on a run's training
  sentences and MRs with the run's frozen embedding and noise levels, and saves it in ``RUN/control``;
- :func:`controlled` is the guidance, a denoiser combinator (every sampler works with it);
  :func:`sample_controlled` draws sentences whose fields match a ``control`` dict;
- :func:`control_success` scores sentences: the value is mentioned in the text *and* a judge
  (:class:`Judge`, bag-of-n-grams logistic regression on clean real sentences) agrees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.diffusion import expand
from unnoise.guidance import LogProb
from unnoise.modalities.text.control_metrics import (
    ABSENT,
    CONTROL_FIELDS,
    Judge,
    control_success,
    mentions,
    train_judge,
)
from unnoise.modalities.text.diffusion_lm import WordEmbedding
from unnoise.modalities.text.pipeline import TextRun, load_text_run, sample_text, text_data
from unnoise.nets.layers import timestep_embedding
from unnoise.nets.transformer import Block
from unnoise.sampling.samplers import Denoiser
from unnoise.schedules import DiscreteSchedule
from unnoise.training.checkpoint import load_module, read_module_meta, save_module

__all__ = [
    "ABSENT",
    "CONTROL_FIELDS",
    "AttributeClassifier",
    "ClassifierConfig",
    "Judge",
    "classifier_accuracy",
    "control_log_prob",
    "control_success",
    "controlled",
    "field_values",
    "load_classifier",
    "mentions",
    "sample_controlled",
    "save_classifier",
    "train_classifier",
    "train_control",
    "train_judge",
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
            classifier = AttributeClassifier(ClassifierConfig(**meta["config"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'meta.json'} is not a classifier config written by save_classifier: {e}") from None
    load_module(folder, classifier)  # checks names and shapes; no pickle
    classifier.metrics = meta.get("metrics", {})
    return classifier.eval()


# ---- guidance --------------------------------------------------------------------------------------


def controlled(
    denoise: Denoiser, log_prob: LogProb, *, scale: float = 1.0, fluency: float = 0.0, steps: int = 1
) -> Denoiser:
    """Diffusion-LM's control (Li et al. 2022, Sec. 5.1) as a denoiser combinator: D' = D + delta_K.

    ``log_prob(x, sigma) -> (B,)`` is log p(c | x, sigma) for the wanted control. ``delta`` shifts the
    x0 estimate, and with the noise estimate ``(x - D) / sigma`` held fixed, the noisy point too
    (to ``x + delta``). It approximately maximises, by ``steps`` proximal-gradient steps from 0,

        J(delta) = scale log p(c | x + delta, sigma) - fluency ||delta||^2 / (2 sigma^2),
        delta_{k+1} = (delta_k + scale sigma^2 grad_x log p(c | x + delta_k, sigma)) / (1 + fluency)

    (the classifier linearised at delta_k, the quadratic kept exact, a proximal term of width sigma),
    stable for every fluency >= 0. How it maps to the paper and to plain classifier guidance:

    - the paper updates the latent x_{t-1} by 3 Adagrad steps on ``lambda log p(x_{t-1} | x_t) +
      log p(c | x_{t-1})``; ``log p(x_{t-1} | x_t) = -||x_{t-1} - mu(x_t)||^2 / (2 sigma_t^2)`` is the
      fluency term that keeps the latent near the model's prediction mu(x_t). Here the same pull is
      on the x0 estimate: ``fluency ||delta||^2 / (2 sigma^2)`` = -fluency log N(D + delta; D, sigma^2 I)
      + const; the fixed point solves ``fluency delta = scale sigma^2 grad log p(c | x + delta)``;
    - ``steps=1, fluency=0`` is exactly :func:`unnoise.guidance.classifier_guidance` (D + s sigma^2
      grad log p(c | x)); ``fluency -> inf`` gives delta = 0, D unchanged;
    - as in the paper (and classifier_guidance) the gradient is the classifier's only: D is not
      differentiated, so it composes with :func:`unnoise.modalities.text.diffusion_lm.clamping` on either side.
      :func:`sample_controlled` clamps the *guided* estimate, ``clamping(controlled(D))``, so the
      control picks words; the paper's order (clamp, then update the latent) is
      ``controlled(clamping(D))``, and there the shift, ~sigma^2, fades before it can change a word:
      on a small E2E run (food=Chinese, scale 3, ddpm, 100 steps, 50 samples) 0.78 control success vs 0.42.
    """
    for name, value in (("scale", scale), ("fluency", fluency)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (gradient steps per denoiser call), got {steps!r}")

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        d = denoise(x, sigma)
        s2 = expand(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x) ** 2
        delta = torch.zeros_like(x)
        for _ in range(steps):
            with torch.enable_grad():  # samplers run under no_grad: a detached leaf, grad on locally
                xg = (x + delta).detach().requires_grad_(True)
                lp = log_prob(xg, torch.as_tensor(sigma).detach())
                if lp.shape != (x.shape[0],):
                    raise ValueError(f"log_prob must return shape ({x.shape[0]},), got {tuple(lp.shape)}")
                (grad,) = torch.autograd.grad(lp.sum(), xg)  # samples independent: each its own gradient
            delta = (delta + scale * s2 * grad) / (1 + fluency)
        return d + delta.to(d.dtype)

    return guided


def control_log_prob(classifier: AttributeClassifier, control: Mapping[str, str]) -> LogProb:
    """log p(control | x, sigma) ``(B,)`` under ``classifier``; the control is checked now (ValueError)."""
    targets = classifier.targets(control)
    return lambda x, sigma: classifier.log_prob(x, sigma, targets)


@torch.no_grad()
def sample_controlled(
    run: TextRun,
    control: Mapping[str, str],
    *,
    n: int = 10,
    sampler: str = "ddpm",
    nfe: int = 100,
    scale: float = 1.0,
    fluency: float = 0.0,
    steps: int = 1,
    seed: int = 0,
    clamp: bool = True,
    classifier: AttributeClassifier | None = None,
    guidance: float | None = None,
) -> list[str]:
    """``n`` sentences steered toward ``control`` (e.g. ``{"food": "Chinese"}``) by :func:`controlled`.

    The unconditional denoiser of the run (the null MR for a conditional run), guided by the
    classifier saved in RUN/control (or ``classifier``), then clamped as in
    :func:`unnoise.modalities.text.pipeline.sample_text`; ``scale=0`` samples without guidance from the same noise.
    ``guidance`` (a run conditioned on meaning representations only) replaces the unconditional
    denoiser by the one given the control as a partial MR (``food[Chinese]``), classifier-free
    guided with that scale, and the classifier steers it: both guides pull toward the attribute.
    ``scale=1`` is Bayes' rule with an exact classifier; a small, noisy classifier needs more (on a
    400-step E2E run, food=Chinese, 100 samples: 0.04 success unguided, 0.58 at scale 1, 0.93 at 10). ``fluency``
    and ``steps``: see :func:`controlled`. Sample i uses ``torch.Generator().manual_seed(seed + i)``.
    """
    if classifier is None:
        if run.run_dir is None:
            raise ValueError("this TextRun has no run folder: pass classifier= (load_classifier(RUN))")
        classifier = load_classifier(run.run_dir)
    c = classifier.config
    if (c.embed_dim, c.seq_len) != (run.model.embedding.dim, run.seq_len):
        raise ValueError(
            f"classifier for (embed_dim, seq_len) = {(c.embed_dim, c.seq_len)}, the run has "
            f"{(run.model.embedding.dim, run.seq_len)}: train it for this run"
        )
    log_prob = control_log_prob(classifier, control)

    def steer(D: Denoiser) -> Denoiser:  # clamping comes after the control (see controlled)
        return controlled(D, log_prob, scale=scale, fluency=fluency, steps=steps) if scale != 0 else D

    options = dict(n=n, sampler=sampler, nfe=nfe, clamp=clamp, seed=seed, steer=steer)
    if guidance is None:
        return sample_text(run, **options)
    if not run.cfg.extra.get("mr_vocab"):
        raise ValueError(
            "classifier-free guidance on the control needs a run conditioned on E2E meaning representations; "
            "this run is unconditional (leave the guidance at 1)"
        )
    mr = ", ".join(f"{field}[{value}]" for field, value in control.items())
    return sample_text(run, **options, mr=mr, guidance=guidance)
