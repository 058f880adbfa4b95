"""Text end to end: Diffusion-LM (Li et al. 2022) on word embeddings, trained and sampled.

The modality is a dataset of sentences (unnoise.modalities.text.data), a network (a bidirectional
transformer over embeddings, unnoise.nets.transformer) with a jointly learned embedding table,
and an encode/decode pair (tokens -> embeddings; rounding to the nearest embedding). The trainer
and the samplers stay generic: the objective is Diffusion-LM's, passed to ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unnoise.denoisers import labelled
from unnoise.guidance import conditioned
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
from unnoise.modalities.text.diffusion_lm import (
    WordEmbedding,
    clamping,
    diffusion_lm_loss,
    infill,
    text_denoiser,
    text_elbo,
)
from unnoise.nets.transformer import TextTransformer, TransformerConfig
from unnoise.sampling.front import sample as run_sampler
from unnoise.schedules import DiscreteSchedule, make_schedule
from unnoise.training.checkpoint import latest_checkpoint, load_config, load_model_weights
from unnoise.training.distributed import Draws
from unnoise.training.loop import Objective, TrainConfig, train

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


def objective(cfg: TrainConfig, schedule: DiscreteSchedule) -> Objective:
    """Diffusion-LM's loss (L_simple on embeddings + embedding term + rounding) at uniform t.

    With conditions (N, 8), each sample's whole MR is dropped to the null MR (all 0) with
    probability ``p_uncond``, for classifier-free guidance.
    """

    def loss(model: DiffusionLM, ids: Tensor, cond: Tensor, draws: Draws) -> Tensor:
        t = draws.randint(1, schedule.T + 1).to(ids.device)
        noise = draws.randn(*ids.shape[1:], model.embedding.dim).to(ids.device)
        c = None
        if cond.ndim == 2:
            keep = (draws.rand() >= cfg.p_uncond).long()[:, None].to(cond.device)
            c = cond * keep
        return diffusion_lm_loss(model.net, model.embedding, ids, schedule, t, noise, c).loss.mean()

    return loss


def train_text(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> DiffusionLM:
    """Train on ``cfg.data``; tokenizer, MR vocabulary and network sizes go into the run's config.json.

    ``stop(step)`` may end training early (see :func:`unnoise.training.loop.train`).
    """
    torch.manual_seed(cfg.seed)
    text, mrs = text_data(cfg, "train")
    tokenizer = Tokenizer.build(text)
    seq_len = int(cfg.extra.get("seq_len", 2 + max(len(tokenize(s)) for s in text)))
    conditional = cfg.conditional and mrs is not None
    cond_vocab = sorted({tok for mr in mrs for tok in mr_tokens(mr)}) if conditional else []
    config = TransformerConfig.preset(
        cfg.model,
        seq_len,
        int(cfg.extra.get("embed_dim", 16)),
        cond_vocab=len(cond_vocab) + 1 if conditional else None,
        cond_len=len(E2E_ATTRIBUTES) if conditional else 0,
    )
    config = dataclasses.replace(config, **cfg.extra.get("net", {}))  # e.g. {"width": 128, "depth": 6}
    cfg.extra |= {
        "modality": "text",
        "tokenizer": tokenizer.to_json(),
        "transformer": dataclasses.asdict(config),
        "seq_len": seq_len,
        "mr_vocab": cond_vocab,
    }
    model = DiffusionLM(config, tokenizer.vocab_size)
    ids = tokenizer.encode_batch(text, seq_len)
    cond = encode_mrs(mrs, cond_vocab) if conditional else torch.full((len(ids),), -1)
    loss_fn = objective(cfg, make_schedule(cfg.schedule, cfg.T))
    return train(cfg, run_dir, model, ids, cond, loss_fn=loss_fn, resume=resume, progress=progress, stop=stop)


@dataclass
class TextRun:
    model: DiffusionLM  # EMA weights
    tokenizer: Tokenizer
    schedule: DiscreteSchedule
    cfg: TrainConfig
    run_dir: Path | None = None  # where it was loaded from (RUN/control holds its attribute classifier)

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
    return TextRun(model.eval(), tokenizer, make_schedule(cfg.schedule, cfg.T), cfg, Path(run_dir))


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


def _denoiser(run: TextRun, n: int, mr: str | None, guidance: float):
    vocab = run.cfg.extra.get("mr_vocab") or []
    if mr is None:
        if guidance != 1.0:
            raise ValueError("guidance needs a meaning representation (--mr)")
        return text_denoiser(run.model.net, run.schedule, None)
    if not vocab:
        raise ValueError("this text model is unconditional: --mr needs a model trained on E2E meaning representations")
    cond = encode_mrs([parse_mr(mr)], vocab).expand(n, -1)
    conditional = labelled(run.model.net, run.schedule, prediction="x0")
    return conditioned(conditional, cond, torch.zeros_like(cond), guidance)


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
) -> list[str]:
    """``n`` sentences; with a template, its blanks (``___``) filled in and its words kept; with a
    meaning representation (E2E syntax, ``"name[Alimentum], food[Chinese]"``), data-to-text,
    classifier-free guided with scale ``guidance`` (1: plain conditional). ``steer(D) -> D``
    wraps the denoiser before clamping (attribute control, :mod:`unnoise.modalities.text.control`)."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    E, L = run.model.embedding.dim, run.seq_len
    s_max, s_min = run.schedule.sigma_max, run.schedule.sigma_min
    x = torch.stack([torch.randn(L, E, generator=g) for g in generators]) * s_max
    D = _denoiser(run, n, mr, guidance)
    if steer is not None:
        D = steer(D)
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
    idea without a download), for generated and held-out real text, and their distinct-2 (the
    real text's on as many sentences as were generated, since distinct-n depends on corpus size)."""
    from unnoise.modalities.text.metrics import KneserNeyLM, distinct_n

    lm = KneserNeyLM(order=3).fit([tokenize(s) for s in sentences(run.cfg, "train")])
    real = [tokenize(s) for s in sentences(run.cfg, "held_out")]
    fake = [tokenize(s) for s in generated if s.strip()] or [["<unk>"]]
    # distinct-n falls as a corpus grows: compare equal numbers of sentences (a fixed random subset).
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[: len(fake)].tolist()
    return {
        "ppl_generated": lm.perplexity(fake),
        "ppl_held_out": lm.perplexity(real),
        "distinct2_generated": distinct_n(fake, 2),
        "distinct2_held_out": distinct_n([real[i] for i in pick], 2),
    }


@torch.no_grad()
def bits_per_token(
    run: TextRun,
    *,
    n: int | None = 200,
    steps: int | None = 100,
    conditional: bool = False,
    batch_size: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Held-out negative ELBO in bits per token (words and ``<end>``; pads, which follow from the
    end, are modelled but not counted): (estimate, standard error), from
    :func:`unnoise.modalities.text.diffusion_lm.text_elbo` on the first ``n`` held-out sentences (None: all).

    ``steps`` strata (at most T - 1) estimate the sum over t (None: all T steps, exact but T calls).
    ``conditional`` scores p(w | MR) with each sentence's meaning representation; otherwise p(w)
    under the null MR. The estimate is total bits over total tokens; its standard error is the
    ratio estimator's.
    """
    text, mrs = text_data(run.cfg, "held_out")
    text, mrs = text[:n], (mrs or [])[:n]
    vocab = run.cfg.extra.get("mr_vocab") or []
    if conditional and not vocab:
        raise ValueError("this text model is unconditional: bits/token given the MR needs an E2E-conditioned model")
    ids = run.tokenizer.encode_batch(text, run.seq_len)
    cond = encode_mrs(mrs, vocab) if conditional else None
    steps = None if steps is None else min(steps, run.schedule.T - 1)
    bits, tokens = [], []
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        g = torch.Generator().manual_seed(seed + start)
        e = text_elbo(
            run.model.net, run.model.embedding, ids[rows], run.schedule,
            None if cond is None else cond[rows], steps=steps, generator=g,
        )  # fmt: skip
        bits.append(e.nats.double() / math.log(2))
        tokens.append((ids[rows] != run.tokenizer.pad_id).sum(1).double())
    b, k = torch.cat(bits), torch.cat(tokens)
    ratio = (b.sum() / k.sum()).item()
    n_seq = len(b)
    if n_seq < 2:
        return ratio, float("nan")
    stderr = ((b - ratio * k).square().sum() * n_seq / (n_seq - 1)).sqrt() / k.sum()
    return ratio, stderr.item()


def evaluate_text(
    run: TextRun,
    *,
    n: int = 200,
    sampler: str = "dpmpp_2m_sde",
    nfe: int = 50,
    guidance: float = 1.0,
    mrs: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """The text issue's figures for a run: :func:`fluency` of ``n`` unconditional samples (with the
    ratios the goals are stated in), and, for runs conditioned on E2E meaning representations,
    corpus BLEU of data-to-text on up to ``mrs`` held-out MRs (one sentence each, scored against
    all the references of that MR; MRs with an item the model never saw are skipped)."""
    from unnoise.modalities.text.metrics import bleu

    scores = fluency(run, sample_text(run, n=n, sampler=sampler, nfe=nfe, seed=seed))
    scores["ppl_ratio"] = scores["ppl_generated"] / scores["ppl_held_out"]
    scores["distinct2_ratio"] = scores["distinct2_generated"] / scores["distinct2_held_out"]
    vocab = set(run.cfg.extra.get("mr_vocab") or [])
    if not vocab:
        return scores
    texts, held_mrs = text_data(run.cfg, "held_out")
    references: dict[str, list[list[str]]] = {}
    for text, mr in zip(texts, held_mrs or [], strict=True):
        if set(mr_tokens(mr)) <= vocab:
            references.setdefault(", ".join(f"{k}[{v}]" for k, v in mr.items()), []).append(tokenize(text))
    chosen = sorted(references)[:mrs]
    if chosen:
        hypotheses = [
            tokenize(sample_text(run, n=1, sampler=sampler, nfe=nfe, mr=mr, guidance=guidance, seed=seed + i)[0])
            or ["<unk>"]  # an empty sentence still counts, with no matches
            for i, mr in enumerate(chosen)
        ]
        scores["bleu"] = bleu(hypotheses, [references[mr] for mr in chosen])
        scores["bleu_mrs"] = float(len(chosen))
    return scores
