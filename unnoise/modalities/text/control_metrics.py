"""Control success on E2E: the asked-for value is in the text, and a judge trained on real sentences agrees.

- :func:`mentions`: a rule per field on the tokenized sentence (case-insensitive, multi-word values
  as contiguous token runs, a few paraphrases E2E writers use: "kid friendly" for familyFriendly
  yes, a negation near it for no, a rating word near "high" for customer rating high, ...);
- :class:`Judge`: per field, a multinomial logistic regression on binary bags of word uni- and
  bigrams (scikit-learn), trained on clean real sentences; its classes are the field's values
  plus ``"absent"``. Its held-out accuracy says how far to trust it;
- :func:`control_success`: the fraction of sentences passing both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from unnoise.modalities.text.data import tokenize

if TYPE_CHECKING:
    from unnoise.modalities.text.pipeline import TextRun

__all__ = ["ABSENT", "CONTROL_FIELDS", "Judge", "control_success", "mentions", "train_judge"]

ABSENT = "absent"  # a field the MR does not mention (class 0 of the attribute classifier)
CONTROL_FIELDS = ("food", "area", "priceRange", "eatType", "familyFriendly", "customer rating")

# Paraphrases accepted beyond the value itself (tokenized, lowercase), per (field, value).
_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("food", "English"): ("english", "british"),
    ("area", "riverside"): ("riverside", "river"),
    ("area", "city centre"): ("city centre", "city center", "centre of the city", "center of the city"),
    ("priceRange", "moderate"): ("moderate", "moderately"),
    ("priceRange", "cheap"): ("cheap", "inexpensive", "low price", "low - price", "low priced", "low cost"),
    ("priceRange", "less than £20"): ("less than £ 20", "under £ 20", "below £ 20", "less than 20", "under 20"),
    ("priceRange", "£20-25"): ("£ 20 - 25", "£ 20 - £ 25", "20 - 25"),
    ("priceRange", "more than £30"): ("more than £ 30", "over £ 30", "above £ 30", "more than 30", "over 30"),
    ("customer rating", "1 out of 5"): ("1 out of 5", "one out of five", "1 star", "one star"),
    ("customer rating", "3 out of 5"): ("3 out of 5", "three out of five", "3 stars", "three stars"),
    ("customer rating", "5 out of 5"): ("5 out of 5", "five out of five", "5 stars", "five stars"),
}
_PRICE_WORDS = {"price", "prices", "priced", "pricing", "cost", "costs", "costly"}
_RATING_WORDS = {"rating", "ratings", "rated", "rate", "rates", "review", "reviews", "reviewed", "star", "stars"}
_FAMILY_WORDS = {"family", "families", "kid", "kids", "child", "children"}
_NEGATIONS = {
    "not",
    "no",
    "non",
    "never",
    "nor",
    "without",
    "isn",
    "aren",
    "doesn",
    "don",
    "cannot",
    "adults",
    "adult",
    "unfriendly",
}


def _has(tokens: list[str], phrase: str) -> list[int]:
    """Start positions of ``phrase`` (tokenized) as a contiguous run in ``tokens``."""
    p = tokenize(phrase)
    return [i for i in range(len(tokens) - len(p) + 1) if tokens[i : i + len(p)] == p]


def _near(tokens: list[str], at: list[int], words: set[str], before: int, after: int) -> bool:
    return any(w in words for i in at for w in tokens[max(0, i - before) : i + after + 1])


def mentions(sentence: str, field: str, value: str) -> bool:
    """Whether ``sentence`` states ``field = value`` in words (case-insensitive; see the module docstring).

    familyFriendly: a family word (family, kids, children, ...) with no negation (not, no, isn't,
    adults, ...) within 4 tokens before or 3 after it for "yes", with one for "no". customer rating
    low/average/high: the word within 4 tokens of a rating word (rating, rated, stars, ...).
    priceRange high: "expensive", or "high" within 4 tokens of a price word. Otherwise the value or a listed paraphrase.
    """
    tokens = tokenize(sentence)
    if field == "familyFriendly":
        if value not in ("yes", "no"):
            raise ValueError(f"familyFriendly takes yes or no, got {value!r}")
        at = [i for i, t in enumerate(tokens) if t in _FAMILY_WORDS]
        negated = [i for i in at if _near(tokens, [i], _NEGATIONS, 4, 3)]
        return bool(negated) if value == "no" else len(negated) < len(at)
    if field == "customer rating" and value in ("low", "average", "high"):
        at = [i for w in ((value, "highly") if value == "high" else (value,)) for i in _has(tokens, w)]
        return _near(tokens, at, _RATING_WORDS, 4, 4)
    if field == "priceRange" and value == "high":
        return bool(_has(tokens, "expensive")) or _near(tokens, _has(tokens, "high"), _PRICE_WORDS, 4, 4)
    return any(_has(tokens, p) for p in _PHRASES.get((field, value), (value,)))


class Judge:
    """Per-field logistic regressions on bags of word 1-2-grams, fit on clean real sentences.

    ``predict(sentences, field)`` gives each sentence's most likely value (or ``"absent"``);
    ``accuracy`` holds the held-out accuracy per field when fit with held-out data.
    """

    def __init__(self, vectorizer: Any, models: dict[str, Any], accuracy: dict[str, float] | None = None) -> None:
        self.vectorizer, self.models, self.accuracy = vectorizer, models, dict(accuracy or {})

    @property
    def fields(self) -> list[str]:
        return list(self.models)

    def classes(self, field: str) -> list[str]:
        self._check(field)
        return [str(c) for c in self.models[field].classes_]

    def _check(self, field: str, value: str | None = None) -> None:
        if field not in self.models:
            raise ValueError(f"unknown field {field!r}; allowed: {', '.join(self.models)}")
        allowed = [str(c) for c in self.models[field].classes_ if c != ABSENT]
        if value is not None and value not in allowed:
            raise ValueError(f"unknown value {value!r} for {field}; allowed: {', '.join(allowed)}")

    @classmethod
    def fit(
        cls,
        sentences: Sequence[str],
        mrs: Sequence[Mapping[str, str]],
        fields: Sequence[str] = CONTROL_FIELDS,
        *,
        held_out: tuple[Sequence[str], Sequence[Mapping[str, str]]] | None = None,
    ) -> Judge:
        """Fit on (sentence, MR) pairs; with ``held_out`` pairs, record each field's accuracy on them."""
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(sentences) != len(mrs) or not sentences:
            raise ValueError(f"need as many MRs as sentences (> 0), got {len(sentences)} and {len(mrs)}")
        vectorizer = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2),
                                     binary=True, min_df=2)  # fmt: skip
        X = vectorizer.fit_transform(sentences)
        models = {}
        for f in fields:
            y = [mr.get(f, ABSENT) for mr in mrs]
            if len(set(y)) > 1:  # a field with one class has nothing to judge
                models[f] = LogisticRegression(max_iter=2000, C=1.0).fit(X, y)
        judge = cls(vectorizer, models)
        if held_out is not None:
            text, held_mrs = held_out
            for f in judge.fields:
                pred = judge.predict(text, f)
                judge.accuracy[f] = sum(p == mr.get(f, ABSENT) for p, mr in zip(pred, held_mrs, strict=True)) / len(
                    pred
                )
        return judge

    def predict(self, sentences: Sequence[str], field: str) -> list[str]:
        self._check(field)
        if not sentences:
            return []
        return [str(p) for p in self.models[field].predict(self.vectorizer.transform(list(sentences)))]


def train_judge(run: TextRun, fields: Sequence[str] = CONTROL_FIELDS) -> Judge:
    """A :class:`Judge` on a text run's training sentences, with its accuracy on the run's held-out MRs."""
    from unnoise.modalities.text.pipeline import text_data

    text, mrs = text_data(run.cfg, "train")
    if mrs is None:
        raise ValueError(f"the judge needs E2E meaning representations; this run has data={run.cfg.data!r}")
    held_text, held_mrs = text_data(run.cfg, "held_out")
    return Judge.fit(text, mrs, fields, held_out=(held_text, held_mrs))


def control_success(sentences: Sequence[str], field: str, value: str, judge: Judge) -> float:
    """Fraction of ``sentences`` where ``value`` is mentioned (:func:`mentions`) and ``judge`` predicts it."""
    judge._check(field, value)
    if not sentences:
        raise ValueError("control_success needs at least one sentence")
    verdicts = judge.predict(sentences, field)
    return sum(mentions(s, field, value) and v == value for s, v in zip(sentences, verdicts, strict=True)) / len(
        sentences
    )
