"""Text end to end: Diffusion-LM (Li et al. 2022) on word embeddings, trained and sampled.

The modality is a dataset of sentences (unnoise.data.text), a network (a bidirectional
transformer over embeddings, unnoise.nets.transformer) with a jointly learned embedding table,
and an encode/decode pair (tokens -> embeddings; rounding to the nearest embedding). The trainer
and the samplers stay generic: the objective is Diffusion-LM's, passed to ``train``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unnoise.checkpoint import latest_checkpoint, load_config, load_model_weights
from unnoise.data.text import TINY_CORPUS, Tokenizer, load_e2e, load_lines, split_by_mr, tokenize
from unnoise.nets.transformer import TextTransformer, TransformerConfig
from unnoise.sampling import sample as run_sampler
from unnoise.schedules import DiscreteSchedule, make_schedule
from unnoise.text_diffusion import WordEmbedding, clamping, diffusion_lm_loss, infill, text_denoiser
from unnoise.train import Objective, TrainConfig, train

BLANK = "___"


class DiffusionLM(nn.Module):
    """The trainable whole: the denoising transformer and the word embedding it diffuses."""

    def __init__(self, config: TransformerConfig, vocab_size: int) -> None:
        super().__init__()
        self.net = TextTransformer(config)
        self.embedding = WordEmbedding(vocab_size, config.embed_dim)


def sentences(cfg: TrainConfig, split: str = "train") -> list[str]:
    """The run's sentences: "tiny" (built in), "e2e" (split by meaning representation) or a file."""
    if cfg.data == "tiny":
        data = list(TINY_CORPUS)
    elif cfg.data == "e2e":
        train_pairs, held_out = split_by_mr(load_e2e(), held_out=0.1, seed=0)
        return [s for _, s in (train_pairs if split == "train" else held_out)]
    elif Path(cfg.data).is_file():
        data = load_lines(cfg.data)
    else:
        raise ValueError(f"unknown text data {cfg.data!r}; allowed: tiny, e2e, or a text file (one sentence a line)")
    cut = max(1, int(0.9 * len(data))) if len(data) > 1 else 1
    return data[:cut] if split == "train" else data[cut:] or data[-1:]


def objective(cfg: TrainConfig, schedule: DiscreteSchedule) -> Objective:
    """Diffusion-LM's loss (L_simple on embeddings + embedding term + rounding) at uniform t."""

    def loss(model: DiffusionLM, ids: Tensor, _labels: Tensor, g: torch.Generator) -> Tensor:
        t = torch.randint(1, schedule.T + 1, (ids.shape[0],), generator=g)
        noise = torch.randn((*ids.shape, model.embedding.dim), generator=g)
        return diffusion_lm_loss(model.net, model.embedding, ids, schedule, t, noise).loss.mean()

    return loss


def train_text(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> DiffusionLM:
    """Train on ``cfg.data``; the tokenizer and network sizes are saved in the run's config.json."""
    torch.manual_seed(cfg.seed)
    text = sentences(cfg, "train")
    tokenizer = Tokenizer.build(text)
    seq_len = int(cfg.extra.get("seq_len", 2 + max(len(tokenize(s)) for s in text)))
    config = TransformerConfig.preset(cfg.model, seq_len, int(cfg.extra.get("embed_dim", 16)))
    config = dataclasses.replace(config, **cfg.extra.get("net", {}))  # e.g. {"width": 128, "depth": 6}
    cfg.extra |= {
        "modality": "text",
        "tokenizer": tokenizer.to_json(),
        "transformer": dataclasses.asdict(config),
        "seq_len": seq_len,
    }
    model = DiffusionLM(config, tokenizer.vocab_size)
    ids = tokenizer.encode_batch(text, seq_len)
    loss_fn = objective(cfg, make_schedule(cfg.schedule, cfg.T))
    return train(
        cfg, run_dir, model, ids, torch.full((len(ids),), -1), loss_fn=loss_fn, resume=resume, progress=progress
    )


@dataclass
class TextRun:
    model: DiffusionLM  # EMA weights
    tokenizer: Tokenizer
    schedule: DiscreteSchedule
    cfg: TrainConfig

    @property
    def seq_len(self) -> int:
        return self.model.net.config.seq_len


def load_text_run(run_dir: str | Path) -> TextRun:
    config = load_config(run_dir)
    cfg = TrainConfig(**config.get("train", {}))
    if cfg.extra.get("modality") != "text":
        raise ValueError(f"{Path(run_dir) / 'config.json'} is not a text run")
    tokenizer = Tokenizer.from_json(cfg.extra["tokenizer"])
    model = DiffusionLM(TransformerConfig(**cfg.extra["transformer"]), tokenizer.vocab_size)
    step = latest_checkpoint(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first (unnoise train text ...)")
    load_model_weights(step, model, which="ema")
    return TextRun(model.eval(), tokenizer, make_schedule(cfg.schedule, cfg.T), cfg)


def parse_template(run: TextRun, template: str) -> tuple[Tensor, Tensor]:
    """ "the ___ is near the ___" -> (ids (L,), known mask (L,)): words fixed, blanks free.

    The sentence ends after the template (an end token follows it, then padding, all fixed).
    """
    words = [w for part in template.split() for w in ([BLANK] if part == BLANK else tokenize(part))]
    if len(words) + 1 > run.seq_len:
        raise ValueError(f"template has {len(words)} words; this model takes at most {run.seq_len - 1}")
    unknown = [w for w in words if w != BLANK and w not in run.tokenizer.vocab]
    if unknown:
        raise ValueError(f"template words not in the model's vocabulary: {', '.join(unknown[:5])}")
    ids = torch.full((run.seq_len,), run.tokenizer.pad_id)
    known = torch.ones(run.seq_len, dtype=torch.bool)
    for i, w in enumerate(words):
        if w == BLANK:
            known[i] = False
        else:
            ids[i] = run.tokenizer.vocab.index(w)
    ids[len(words)] = run.tokenizer.end_id
    return ids, known


@torch.no_grad()
def sample_text(
    run: TextRun,
    *,
    n: int = 10,
    sampler: str = "dpmpp_2m",
    nfe: int = 50,
    template: str | None = None,
    clamp: bool = True,
    seed: int = 0,
) -> list[str]:
    """``n`` sentences; with a template, its blanks (``___``) filled in and its words kept."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    E, L = run.model.embedding.dim, run.seq_len
    s_max, s_min = run.schedule.sigma_max, run.schedule.sigma_min
    x = torch.stack([torch.randn(L, E, generator=g) for g in generators]) * s_max
    D = text_denoiser(run.model.net, run.schedule)
    if clamp:
        D = clamping(D, run.model.embedding)
    if template is not None:
        ids, known = parse_template(run, template)
        D = infill(D, known.expand(n, L), run.model.embedding.embed(ids.expand(n, L)), generator=generators)
    out = run_sampler(D, x, sampler=sampler, nfe=nfe, sigma_max=s_max, sigma_min=s_min, generator=generators)
    return [run.tokenizer.decode(row) for row in run.model.embedding.round(out)]


def save_sentences(path: str | Path, lines: list[str]) -> Path:
    """One sentence a line (.txt) or one JSON object a line (.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": s}) + "\n" for s in lines), encoding="utf-8")
    else:
        path.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    return path


def fluency(run: TextRun, generated: list[str]) -> dict[str, float]:
    """Perplexity under a Kneser-Ney trigram LM fitted on the training sentences (the "lm-score"
    idea without a download), for generated and held-out real text, and their distinct-2."""
    from unnoise.text_metrics import KneserNeyLM, distinct_n

    lm = KneserNeyLM(order=3).fit([tokenize(s) for s in sentences(run.cfg, "train")])
    real = [tokenize(s) for s in sentences(run.cfg, "held_out")]
    fake = [tokenize(s) for s in generated if s.strip()] or [["<unk>"]]
    return {
        "ppl_generated": lm.perplexity(fake),
        "ppl_held_out": lm.perplexity(real),
        "distinct2_generated": distinct_n(fake, 2),
        "distinct2_held_out": distinct_n(real, 2),
    }
