import itertools
import math
import random
import warnings

import pytest

from unnoise.modalities.text.ngrams import EOS, UNK, KneserNeyLM, bleu, distinct_n

CORPUS = [
    "the cat sat on the mat".split(),
    "the dog sat on the log".split(),
    "a cat saw the dog".split(),
    "the dog saw a cat on the mat".split(),
    "cat".split(),
    [],
]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(
    "context",
    [(), ("the",), ("sat", "on"), ("on", "the"), ("zebra",), ("mat", "the"), ("a", "zebra")],
)
def test_kneser_ney_is_a_distribution_over_the_vocabulary(order, context):
    """Seen and unseen contexts: sum over training words + </s> + <unk> is 1."""
    lm = KneserNeyLM(order=order, discount=0.75).fit(CORPUS)
    assert EOS in lm.vocabulary and UNK in lm.vocabulary
    probs = [lm.prob(w, context) for w in lm.vocabulary]
    assert all(p > 0 for p in probs)
    assert math.fsum(probs) == pytest.approx(1.0, abs=1e-9)
    assert lm.prob("zebra", context) == lm.prob(UNK, context)


@pytest.mark.parametrize("discount", [0.1, 0.5, 1.0])
def test_kneser_ney_normalised_for_every_seen_history(discount):
    lm = KneserNeyLM(order=3, discount=discount).fit(CORPUS)
    words = sorted(lm.vocabulary)
    for context in itertools.product(["<s>", *words], repeat=2):
        assert math.fsum(lm.prob(w, context) for w in words) == pytest.approx(1.0, abs=1e-9)


def test_kneser_ney_hand_computed_bigram():
    """Corpus "a b", D = 1/2, V = {a, b, </s>, <unk>}: each of a, b, </s> has one left word, so
    p1(a) = (1 - 1/2)/3 + (1/2)(3/3)(1/4) = 7/24 and p2(a | <s>) = 1/2 + (1/2)(1/1) 7/24 = 31/48."""
    lm = KneserNeyLM(order=2, discount=0.5).fit([["a", "b"]])
    assert lm.prob("a", ["b"]) == pytest.approx(0.5 * 7 / 24, abs=1e-12)  # "b" saw only </s>
    assert lm.prob("a", ["q"]) == pytest.approx(7 / 24, abs=1e-12)  # unseen history: p1
    assert lm.prob("a") == pytest.approx(31 / 48, abs=1e-12)
    assert lm.prob("q") == pytest.approx(0.5 * (0.5 * 1 / 4), abs=1e-12)  # (1/2) p1(<unk>)
    p_b, p_end = 0.5 + 0.5 * 7 / 24, 0.5 + 0.5 * 7 / 24
    assert lm.log_prob(["a", "b"]) == pytest.approx(math.log(31 / 48 * p_b * p_end), abs=1e-12)
    assert lm.perplexity([["a", "b"]]) == pytest.approx(math.exp(-lm.log_prob(["a", "b"]) / 3))


def test_kneser_ney_unigram_on_uniform_data():
    """Order 1, four words seen 3 times each, </s> 12 times: p(w) = (c - D)/N + D T / (N V)."""
    data = [[w] for w in "abcd"] * 3
    d, n_tokens, types, v = 0.75, 24, 5, 6
    lm = KneserNeyLM(order=1, discount=d).fit(data)
    for w in "abcd":
        assert lm.prob(w, ["x", "y"]) == pytest.approx((3 - d) / n_tokens + d * types / n_tokens / v)
    assert lm.prob(EOS) == pytest.approx((12 - d) / n_tokens + d * types / n_tokens / v)
    assert lm.prob("zzz") == pytest.approx(d * types / n_tokens / v)


def test_kneser_ney_symmetric_data_gives_symmetric_probabilities():
    data = [list(p) for p in itertools.permutations("xyz", 2)]
    lm = KneserNeyLM(order=3).fit(data)
    for context in [(), ("x",), ("y", "z")]:
        others = [w for w in "xyz" if w not in context]
        probs = [lm.prob(w, context) for w in others]
        assert max(probs) - min(probs) < 1e-12


def test_perplexity_prefers_word_order_seen_in_training():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    train = []
    for _ in range(200):  # sentences are runs of consecutive words: strong bigram structure
        start = rng.randrange(len(words) - 4)
        train.append(words[start : start + rng.randint(3, 5)])
    shuffled = [rng.sample(s, len(s)) for s in train]
    for order in (2, 3):
        lm = KneserNeyLM(order=order).fit(train)
        assert lm.perplexity(train) < 0.5 * lm.perplexity(shuffled)
    uni = KneserNeyLM(order=1).fit(train)  # a unigram model cannot tell word order apart
    assert uni.perplexity(train) == pytest.approx(uni.perplexity(shuffled))


def test_kneser_ney_bad_input():
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        KneserNeyLM(order=0)
    with pytest.raises(ValueError, match=r"discount must be in \(0, 1\]"):
        KneserNeyLM(discount=1.5)
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        KneserNeyLM().fit([])
    with pytest.raises(ValueError, match="list of str tokens"):
        KneserNeyLM().fit(["a sentence as one string"])
    with pytest.raises(ValueError, match="reserved tokens"):
        KneserNeyLM().fit([["a", "</s>"]])
    with pytest.raises(ValueError, match="must be fit"):
        KneserNeyLM().log_prob(["a"])


def test_distinct_n_hand_examples():
    sentences = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert distinct_n(sentences, 1) == pytest.approx(3 / 7)
    assert distinct_n(sentences, 2) == pytest.approx(3 / 5)  # ab, ba, ab | ab, bc
    assert distinct_n(sentences, 3) == pytest.approx(3 / 3)  # no cross-sentence n-grams
    assert distinct_n(sentences, 5) == 0.0
    assert distinct_n([["x"] * 4], 1) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        distinct_n(sentences, 0)
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        distinct_n([], 1)


def test_bleu_hand_computed():
    hyp = "the cat sat on the mat".split()
    assert bleu([hyp], [[hyp]]) == pytest.approx(1.0)
    assert bleu([hyp], [[["x", "y", "z", "w", "v", "u"]]]) == 0.0
    # Brevity penalty: hypothesis is a 4-token prefix of an 8-token reference, all p_n = 1.
    ref = "one two three four five six seven eight".split()
    assert bleu([ref[:4]], [[ref]]) == pytest.approx(math.exp(1 - 8 / 4))
    # The closest reference length (4, not 8) is used: no penalty.
    assert bleu([ref[:4]], [[ref, ref[:4]]]) == pytest.approx(1.0)
    # Clipping (Papineni's "the the the ..." example), unigrams only: p_1 = 2/7, c = 7 > r = 6.
    refs = [["the", "cat", "is", "on", "the", "mat"], "there is a cat on the mat".split()]
    assert bleu([["the"] * 7], [refs], max_n=1) == pytest.approx(2 / 7)
    # max_n = 2 by hand: p1 = 3/4, p2 = 1/3, c = r = 4, BP = 1.
    got = bleu([["a", "b", "c", "x"]], [[["a", "b", "d", "c"]]], max_n=2)
    assert got == pytest.approx(math.sqrt(3 / 4 * 1 / 3))


def _random_case(rng: random.Random):
    words = list("abcdef")
    hyps, refs = [], []
    for _ in range(rng.randint(1, 5)):
        hyps.append(rng.choices(words, k=rng.randint(4, 12)))
        refs.append([rng.choices(words, k=rng.randint(2, 14)) for _ in range(rng.randint(1, 3))])
    return hyps, refs


def test_bleu_equals_nltk_corpus_bleu():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hyp1 = "it is a guide to action which ensures that the military always obeys".split()
    refs1 = [
        "it is a guide to action that ensures that the military will forever heed".split(),
        "it is the guiding principle which guarantees the military forces always".split(),
        "it is the practical guide for the army always to heed the directions".split(),
    ]
    hyp2 = "he read the book because he was interested in world history".split()
    refs2 = ["he was interested in world history because he read the book".split()]
    cases = [([hyp1, hyp2], [refs1, refs2]), ([hyp1], [refs1]), ([hyp2], [refs2])]
    rng = random.Random(0)
    cases += [_random_case(rng) for _ in range(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when some p_n is 0
        for hyps, refs in cases:
            want = bleu_score.corpus_bleu(refs, hyps)
            assert bleu(hyps, refs) == pytest.approx(want, abs=1e-9)
    assert any(bleu(h, r) > 0.01 for h, r in cases[3:])  # the random cases are not all zero


def test_bleu_bad_input():
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        bleu([["a"]], [[["a"]]], max_n=0)
    with pytest.raises(ValueError, match="one list of references per hypothesis"):
        bleu([["a"]], [[["a"]], [["b"]]])
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        bleu([], [])
    with pytest.raises(ValueError, match="each entry of references_list"):
        bleu([["a"]], [[]])
