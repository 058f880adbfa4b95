"""Text generation with Diffusion-LM: a run's sentences, infilled templates and data-to-text.

Samples are embeddings (B, L, E) drawn by any sampler from the run's denoiser, snapped to words
by the clamping trick while sampling and rounded to token ids at the end
(:mod:`unnoise.modalities.text.diffusion_lm`). Also the run's data (sentences, meaning
representations as condition ids) and the :class:`TextRun` view of a loaded run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from unnoise.modalities.run import Run, load_run
from unnoise.modalities.text.data import (
    E2E_ATTRIBUTES,
    TINY_CORPUS,
    Tokenizer,
    load_e2e,
    load_lines,
    parse_mr,
    split_by_mr,
    tokenize,
)
from unnoise.modalities.text.diffusion_lm import WordEmbedding, clamping, infill
from unnoise.nets.transformer import TextTransformer, TransformerConfig
from unnoise.sampling.front import sample as run_sampler
from unnoise.training.config import TrainConfig

BLANK = "___"


class DiffusionLM(nn.Module):
    """The trainable whole: the denoising transformer and the word embedding it diffuses."""

    def __init__(self, config: TransformerConfig, vocab_size: int) -> None:
        super().__init__()
        self.net = TextTransformer(config)
        self.embedding = WordEmbedding(vocab_size, config.embed_dim)


def text_data(cfg: TrainConfig, split: str = "train") -> tuple[list[str], list[dict[str, str]] | None]:
    """The run's sentences, with their meaning representations where the data has them (E2E).

    "tiny" (built in) and text files are split 90/10 in order; E2E is split by meaning
    representation (``split_by_mr``), so no MR is in both parts.
    """
    if cfg.data == "e2e":
        train_pairs, held_out = split_by_mr(load_e2e(), held_out=0.1, seed=0)
        pairs = train_pairs if split == "train" else held_out
        return [s for _, s in pairs], [mr for mr, _ in pairs]
    if cfg.data == "tiny":
        data = list(TINY_CORPUS)
    elif Path(cfg.data).is_file():
        data = load_lines(cfg.data)
    else:
        raise ValueError(f"unknown text data {cfg.data!r}; allowed: tiny, e2e, or a text file (one sentence a line)")
    cut = max(1, int(0.9 * len(data))) if len(data) > 1 else 1
    return (data[:cut] if split == "train" else data[cut:] or data[-1:]), None


def sentences(cfg: TrainConfig, split: str = "train") -> list[str]:
    return text_data(cfg, split)[0]


def mr_tokens(mr: dict[str, str]) -> list[str]:
    """A meaning representation as condition tokens "attribute=value", in E2E's attribute order."""
    return [f"{k}={mr[k]}" for k in E2E_ATTRIBUTES if k in mr]


def encode_mrs(mrs: list[dict[str, str]], vocab: list[str]) -> Tensor:
    """MRs -> condition ids (N, 8): 1 + index in ``vocab`` per item, 0 padding (0 everywhere: the null MR)."""
    index = {tok: i + 1 for i, tok in enumerate(vocab)}
    rows = []
    for mr in mrs:
        toks = mr_tokens(mr)
        unknown = [t for t in toks if t not in index]
        if unknown:
            raise ValueError(f"meaning-representation items unknown to this model: {', '.join(unknown[:4])}")
        ids = [index[t] for t in toks]
        rows.append(ids + [0] * (len(E2E_ATTRIBUTES) - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class TextRun(Run):
    """A text run with its tokenizer and sequence length."""

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_json(self.cfg.extra["tokenizer"])

    @property
    def seq_len(self) -> int:
        return self.model.net.config.seq_len

    @property
    def run_dir(self) -> Path | None:
        return self.path

    @property
    def null(self) -> Tensor | None:
        """The null MR (all padding) of MR-conditioned runs."""
        return torch.zeros(len(E2E_ATTRIBUTES), dtype=torch.long) if self.cfg.extra.get("mr_vocab") else None


def load_text_run(run_dir: str | Path) -> TextRun:
    return load_run(run_dir, expect="text")


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


def _mr_condition(run: TextRun, n: int, mr: str | None) -> Tensor | None:
    if mr is None:
        return None
    vocab = run.cfg.extra.get("mr_vocab") or []
    if not vocab:
        raise ValueError("this text model is unconditional: --mr needs a model trained on E2E meaning representations")
    return encode_mrs([parse_mr(mr)], vocab).expand(n, -1)


@torch.no_grad()
def sample_text(
    run: TextRun,
    *,
    n: int = 10,
    sampler: str = "dpmpp_2m_sde",
    nfe: int = 50,
    template: str | None = None,
    mr: str | None = None,
    guidance: float = 1.0,
    clamp: bool = True,
    seed: int = 0,
    steer: Callable | None = None,
    **options,
) -> list[str]:
    """``n`` sentences; with a template, its blanks (``___``) filled in and its words kept; with a
    meaning representation (E2E syntax, ``"name[Alimentum], food[Chinese]"``), data-to-text,
    classifier-free guided with scale ``guidance`` (1: plain conditional). ``steer(D) -> D``
    wraps the denoiser before clamping (attribute control, :mod:`unnoise.modalities.text.control`).
    ``options`` (eta, grid) go to the sampler."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    E, L = run.model.embedding.dim, run.seq_len
    s_max, s_min = run.sigma_max, run.sigma_min
    x = torch.stack([torch.randn(L, E, generator=g) for g in generators]) * s_max
    if mr is None and guidance != 1.0:
        raise ValueError("guidance needs a meaning representation (--mr)")
    D = run.denoiser(_mr_condition(run, n, mr), run.null, guidance)
    if steer is not None:
        D = steer(D)
    if clamp:
        D = clamping(D, run.model.embedding)
    if template is not None:
        ids, known = parse_template(run, template)
        D = infill(D, known.expand(n, L), run.model.embedding.embed(ids.expand(n, L)), generator=generators)
    out = run_sampler(
        D, x, sampler=sampler, nfe=nfe, sigma_max=s_max, sigma_min=s_min, generator=generators,
        schedule=run.schedule, **options,
    )  # fmt: skip
    if not torch.isfinite(out).all():
        raise FloatingPointError("the sampler produced non-finite embeddings: the run's weights are not finite")
    return [run.tokenizer.decode(row) for row in run.model.embedding.round(out)]
