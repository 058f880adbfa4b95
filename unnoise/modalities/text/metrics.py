"""Text metrics of a run: fluency (Kneser-Ney perplexity, distinct-2) of generated against held-out
sentences, data-to-text BLEU, and held-out bits/token (Diffusion-LM's variational bound)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unnoise.diffusion import x0_from_prediction
from unnoise.modalities.text.data import tokenize
from unnoise.modalities.text.diffusion_lm import TextNetwork, text_elbo
from unnoise.modalities.text.ngrams import KneserNeyLM, bleu, distinct_n
from unnoise.modalities.text.pipeline import TextRun, encode_mrs, mr_tokens, sample_text, sentences, text_data


def x0_network(run: TextRun) -> TextNetwork:
    """The run's transformer as an x0-predictor ``net(x_t, t, cond)`` at integer steps t, whatever
    it was trained to predict (the text ELBO scores predictions of x0)."""
    net, prediction = run.model.net, run.cfg.prediction
    if prediction == "x0":
        return net
    alpha_bar = run.schedule.alpha_bar  # index t: alpha_bar[0] = 1

    def predict_x0(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        ab = alpha_bar[t.long().cpu()].to(x_t)
        return x0_from_prediction(net(x_t, t, cond), x_t, ab, prediction)

    return predict_x0


def fluency(run: TextRun, generated: list[str]) -> dict[str, float]:
    """Perplexity under a Kneser-Ney trigram LM fitted on the training sentences (the "lm-score"
    idea without a download), for generated and held-out real text, and their distinct-2 (the
    real text's on as many sentences as were generated, since distinct-n depends on corpus size)."""
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
            x0_network(run), run.model.embedding, ids[rows], run.schedule,
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


def evaluate_lines(
    run: TextRun,
    *,
    bpd: bool = False,
    n: int | None = None,
    sampler: str,
    nfe: int,
    guidance: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """`unnoise eval` on a text run, as lines: held-out bits/token with ``bpd``; otherwise the
    fluency of ``n`` samples against held-out sentences and, for MR-conditioned runs, BLEU."""
    n = n or 200
    if bpd:
        if run.cfg.objective != "ddpm":
            raise ValueError(f"--bpd is the discrete-time (DDPM) bound; this run's objective is {run.cfg.objective!r}")
        bits, se = bits_per_token(run, n=n, seed=seed)
        lines = [f"held-out negative ELBO on {n} sentences: {bits:.3f} +- {se:.3f} bits/token"]
        if run.cfg.extra.get("mr_vocab"):
            bits, se = bits_per_token(run, n=n, seed=seed, conditional=True)
            lines.append(f"  given each sentence's meaning representation: {bits:.3f} +- {se:.3f} bits/token")
        return lines
    s = evaluate_text(run, n=n, sampler=sampler, nfe=nfe, guidance=guidance, seed=seed)
    ppl = f"{s['ppl_generated']:.1f} vs {s['ppl_held_out']:.1f} (ratio {s['ppl_ratio']:.2f})"
    distinct = f"{s['distinct2_generated']:.3f} vs {s['distinct2_held_out']:.3f} (ratio {s['distinct2_ratio']:.2f})"
    lines = [
        f"{n} generated sentences ({sampler}, {nfe} NFE) against the held-out real ones:",
        f"  Kneser-Ney trigram perplexity: {ppl}",
        f"  distinct-2: {distinct}",
    ]
    if "bleu" in s:
        lines.append(
            f"  data-to-text BLEU on {s['bleu_mrs']:.0f} held-out MRs (guidance {guidance:g}): {s['bleu']:.4f}"
        )
    return lines
