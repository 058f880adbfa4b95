"""Text metrics over tokenized sentences: a Kneser-Ney language model, distinct-n and corpus BLEU.

A sentence is a list of tokens (strings); a corpus is a list of sentences. Everything here is pure
Python, so the metrics can score decoded samples of a text diffusion model without extra packages.

- `KneserNeyLM`: interpolated Kneser-Ney n-gram model (Chen and Goodman 1998, "An Empirical Study
  of Smoothing Techniques for Language Modeling", eq. 26 with a single fixed discount D), used to
  score the fluency of generated text by perplexity.
- `distinct_n`: distinct n-grams / all n-grams (Li et al. 2016, "A Diversity-Promoting Objective
  Function for Neural Conversation Models"), a diversity measure.
- `bleu`: corpus BLEU (Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine
  Translation"), with multiple references and no smoothing.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

Sentence = Sequence[str]


def _check_corpus(sentences: Sequence[Sentence], what: str) -> None:
    if len(sentences) == 0:
        raise ValueError(f"{what} must be a non-empty list of sentences (lists of str tokens)")
    for s in sentences:
        if isinstance(s, str) or not all(isinstance(t, str) for t in s):
            raise ValueError(f"{what}: each sentence must be a list of str tokens, got {s!r}")


def _ngrams(tokens: Sentence, n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram language model with a fixed absolute discount.

    For the highest order n, with raw counts c and history h = w_{i-n+1..i-1},

        p_n(w | h) = max(c(h w) - D, 0) / c(h .) + D N1+(h .) / c(h .) * p_{n-1}(w | h'),

    where h' drops the oldest word of h and N1+(h .) is the number of distinct words seen after h.
    Lower orders k < n use the same formula with c replaced by the continuation count
    N1+(. h w) = number of distinct words seen before h w (Chen and Goodman 1998, sec. 3). The
    recursion ends at p_0(w) = 1 / |V|, the uniform distribution over V = training words + "</s>"
    + "<unk>", so unseen words get nonzero probability. A history never seen at level k
    (c(h .) = 0) passes all its mass to level k-1. Because every count is >= 1 >= D, each level
    sums to one over V, so `prob(., context)` is a proper distribution for any context.

    Sentences are padded with n-1 "<s>" tokens and end with "</s>", which is predicted; "<s>" is
    never predicted. Test words outside the training vocabulary are mapped to "<unk>".
    """

    def __init__(self, order: int = 3, discount: float = 0.75) -> None:
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        self.order = order
        self.discount = float(discount)
        self.vocabulary: frozenset[str] = frozenset()
        # counts[k][h][w]: raw counts for k == order, continuation counts N1+(. h w) below.
        self._counts: list[dict[tuple[str, ...], Counter[str]]] = []
        # totals[k][h] = (sum_w counts[k][h][w], number of w with a nonzero count)
        self._totals: list[dict[tuple[str, ...], tuple[int, int]]] = []

    def _pad(self, sentence: Sentence) -> list[str]:
        words = [t if t in self.vocabulary else UNK for t in sentence]
        return [BOS] * (self.order - 1) + words + [EOS]

    def fit(self, sentences: Sequence[Sentence]) -> KneserNeyLM:
        """Count n-grams of `sentences` (a non-empty list of token lists); returns self."""
        _check_corpus(sentences, "sentences")
        if any(BOS in s or EOS in s for s in sentences):
            raise ValueError(f"sentences must not contain the reserved tokens {BOS!r}, {EOS!r}")
        n = self.order
        self.vocabulary = frozenset(t for s in sentences for t in s) | {EOS, UNK}
        top: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        # seen[k]: distinct (k+1)-grams ending on a predicted token, for continuation counts.
        seen: list[set[tuple[str, ...]]] = [set() for _ in range(n)]
        for s in sentences:
            padded = self._pad(s)
            for i in range(n - 1, len(padded)):
                gram = tuple(padded[i - n + 1 : i + 1])
                top[gram[:-1]][gram[-1]] += 1
                for k in range(1, n):
                    seen[k].add(gram[-(k + 1) :])
        self._counts = [{} for _ in range(n + 1)]
        self._counts[n] = dict(top)
        for k in range(1, n):
            cont: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
            for gram in seen[k]:  # gram = (v, h..., w): one distinct left word v of h w
                cont[gram[1:-1]][gram[-1]] += 1
            self._counts[k] = dict(cont)
        self._totals = [{h: (sum(c.values()), len(c)) for h, c in level.items()} for level in self._counts]
        return self

    def prob(self, word: str, context: Sentence = ()) -> float:
        """p(word | context); `context` is the preceding tokens (left-padded with "<s>" if short)."""
        if not self._counts:
            raise ValueError("KneserNeyLM must be fit before use")
        word = word if word in self.vocabulary else UNK
        ctx = [t if t in self.vocabulary or t == BOS else UNK for t in context]
        ctx = ([BOS] * (self.order - 1) + ctx)[len(ctx) :]  # the last order-1 tokens
        return self._prob(word, tuple(ctx))

    def _prob(self, word: str, history: tuple[str, ...]) -> float:
        p = 1.0 / len(self.vocabulary)  # p_0: uniform over V
        d = self.discount
        for k in range(1, self.order + 1):  # p_k from p_{k-1}, history of length k-1
            h = history[len(history) - k + 1 :]  # the last k-1 tokens
            total, types = self._totals[k].get(h, (0, 0))
            if total == 0:
                continue  # unseen history: all mass to the lower order
            count = self._counts[k][h].get(word, 0)
            p = max(count - d, 0.0) / total + d * types / total * p
        return p

    def log_prob(self, sentence: Sentence) -> float:
        """Natural-log probability of `sentence`, including its end token "</s>"."""
        if not self._counts:
            raise ValueError("KneserNeyLM must be fit before use")
        padded = self._pad(sentence)
        n = self.order
        return sum(math.log(self._prob(padded[i], tuple(padded[i - n + 1 : i]))) for i in range(n - 1, len(padded)))

    def perplexity(self, sentences: Sequence[Sentence]) -> float:
        """exp(-sum log p / N), N = number of predicted tokens (words plus one "</s>" each)."""
        _check_corpus(sentences, "sentences")
        total = sum(self.log_prob(s) for s in sentences)
        count = sum(len(s) + 1 for s in sentences)
        return math.exp(-total / count)


def distinct_n(sentences: Sequence[Sentence], n: int) -> float:
    """Distinct-n (Li et al. 2016): number of distinct n-grams / total n-grams over all sentences.

    N-grams do not cross sentence boundaries. Returns 0.0 when no sentence has n tokens.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    _check_corpus(sentences, "sentences")
    grams = [g for s in sentences for g in _ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(
    hypotheses: Sequence[Sentence],
    references_list: Sequence[Sequence[Sentence]],
    max_n: int = 4,
) -> float:
    """Corpus BLEU (Papineni et al. 2002, sec. 2.3), uniform weights 1/max_n, no smoothing.

        BLEU = BP * exp(sum_{n=1}^{N} (1/N) log p_n),  BP = min(1, exp(1 - r / c)),

    p_n = sum over hypotheses of clipped n-gram matches / sum of hypothesis n-gram counts, where a
    match of an n-gram is clipped to its largest count in any one reference; c is the total
    hypothesis length and r the sum of the reference lengths closest to each hypothesis length
    (ties go to the shorter reference). Returns 0.0 when any p_n is 0 (no smoothing).

    On tokenized input this equals `nltk.translate.bleu_score.corpus_bleu` with default weights
    whenever each hypothesis has at least `max_n` tokens; NLTK counts at least one n-gram per
    hypothesis in the denominator of p_n, which differs from the paper for shorter hypotheses.
    """
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
    _check_corpus(hypotheses, "hypotheses")
    if len(references_list) != len(hypotheses):
        raise ValueError(
            f"references_list must hold one list of references per hypothesis: got "
            f"{len(references_list)} for {len(hypotheses)} hypotheses"
        )
    for refs in references_list:
        _check_corpus(refs, "each entry of references_list")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references_list, strict=True):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda r: (abs(r - len(hyp)), r))
        for n in range(1, max_n + 1):
            counts = Counter(_ngrams(hyp, n))
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in refs:
                max_ref |= Counter(_ngrams(r, n))  # | keeps the per-n-gram maximum
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)
