"""Text data: the E2E restaurant corpus, plain-text files, a tiny built-in corpus and a word tokenizer.

Diffusion-LM (Li et al. 2022) trains on E2E (Novikova, Dusek, Rieser 2017): pairs of a meaning
representation (MR) such as ``name[Alimentum], area[city centre]`` and a sentence that expresses it.
``load_e2e`` returns ``(parsed MR, sentence)`` pairs; ``split_by_mr`` holds out whole MRs so that a
held-out sentence never shares its MR with a training one. The :class:`Tokenizer` maps sentences to
fixed-length long tensors of word ids (the model then embeds them) and back; it is saved as JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "E2E_ATTRIBUTES",
    "E2E_FILES",
    "SPECIAL_TOKENS",
    "TINY_CORPUS",
    "Tokenizer",
    "load_e2e",
    "load_lines",
    "parse_mr",
    "split_by_mr",
    "tokenize",
]

E2E_ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
E2E_FILES = {"dev": "devset.csv", "test": "testset_w_refs.csv"}  # trainset.csv is not available offline
_E2E_DEFAULT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "e2e"
_MR_ITEM = r"\s*([^\[\],]+?)\s*\[([^\[\]]+)\]\s*"  # attribute[value]
_MR = re.compile(rf"{_MR_ITEM}(?:,{_MR_ITEM})*")

# Short, simple sentences written for this project (restaurant / river themed), already in tokenized form.
TINY_CORPUS: list[str] = [
    "the cafe is near the river .",
    "the pub is in the city centre .",
    "the restaurant serves cheap food .",
    "the river is quiet in the morning .",
    "a small cafe sits by the river .",
    "the pub serves english food .",
    "the restaurant is family friendly .",
    "the cafe is not family friendly .",
    "the food at the pub is good .",
    "we ate fish by the river .",
    "the coffee shop is near the bridge .",
    "the restaurant has a high rating .",
    "the pub has a low rating .",
    "the cafe serves coffee and cake .",
    "the river runs past the pub .",
    "the restaurant is near the park .",
    "the food is cheap and good .",
    "the coffee is hot .",
    "the pub is open late .",
    "the cafe opens early .",
    "a boat goes down the river .",
    "the restaurant serves italian food .",
    "the restaurant serves french food .",
    "the cafe serves indian food .",
    "the pub is near the cafe .",
    "the river is wide and slow .",
    "the prices are moderate .",
    "the prices are high .",
    "the food is fresh .",
    "children are welcome at the cafe .",
    "children are not welcome at the pub .",
    "the restaurant is by the water .",
    "the bridge crosses the river .",
    "the cafe has tables outside .",
    "we sat outside by the river .",
    "the pub has a garden .",
    "the garden looks at the river .",
    "the restaurant is busy at night .",
    "the cafe is quiet in the afternoon .",
    "the soup is warm and good .",
    "the bread is fresh .",
    "the tea is cheap .",
    "the fish comes from the river .",
    "the pub is old and small .",
    "the restaurant is new and large .",
    "the cafe is in the city centre .",
    "the pub is by the riverside .",
    "the restaurant has good service .",
    "the staff at the cafe are kind .",
    "the food at the restaurant is average .",
    "the coffee shop serves fast food .",
    "the pub serves chinese food .",
    "the restaurant serves japanese food .",
    "a family eats at the restaurant .",
    "the river is cold in winter .",
    "the cafe is warm in winter .",
    "the pub is near the river bridge .",
    "the restaurant is not cheap .",
    "the cafe is cheap and friendly .",
    "the river is near the city centre .",
]


def parse_mr(mr: str) -> dict[str, str]:
    """E2E meaning representation ``"name[X], area[riverside]"`` -> ``{"name": "X", "area": "riverside"}``.

    Attributes must be among ``E2E_ATTRIBUTES``, each at most once; values are kept verbatim (stripped).
    """
    if not isinstance(mr, str) or not mr.strip():
        raise ValueError(f"meaning representation must be non-empty text like 'name[X], area[riverside]'; got {mr!r}")
    parsed: dict[str, str] = {}
    if _MR.fullmatch(mr) is None:
        raise ValueError(f"malformed meaning representation {mr!r}: expected 'attribute[value], attribute[value], ...'")
    for key, value in re.findall(_MR_ITEM, mr):
        value = value.strip()
        if key not in E2E_ATTRIBUTES:
            raise ValueError(f"unknown attribute {key!r} in {mr!r}; allowed: {', '.join(E2E_ATTRIBUTES)}")
        if key in parsed:
            raise ValueError(f"attribute {key!r} appears twice in meaning representation {mr!r}")
        parsed[key] = value
    return parsed


def _e2e_folder(folder: str | Path | None) -> Path:
    """``folder``, else $UNNOISE_E2E, else the repo's ../shared/data/e2e; FileNotFoundError if not a folder."""
    if folder is not None:
        where, source = Path(folder), "folder="
    elif os.environ.get("UNNOISE_E2E"):
        where, source = Path(os.environ["UNNOISE_E2E"]), "$UNNOISE_E2E"
    else:
        where, source = _E2E_DEFAULT.resolve(), "the default"
    if not where.is_dir():
        raise FileNotFoundError(
            f"E2E data folder {where} (from {source}) not found: pass folder= or set UNNOISE_E2E to the folder "
            f"holding {' and '.join(E2E_FILES.values())}"
        )
    return where


def _read_e2e_csv(file: Path) -> list[tuple[dict[str, str], str]]:
    try:
        with file.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not valid UTF-8 (byte {err.start}): E2E CSV files must be UTF-8") from err
    if not rows or [c.strip().lower() for c in rows[0]] != ["mr", "ref"]:
        raise ValueError(f"{file} must start with the header 'mr,ref'; got {rows[0] if rows else 'an empty file'}")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].strip():
            raise ValueError(f"{file} row {line}: expected 2 fields (mr, non-empty ref); got {row!r}")
        try:
            pairs.append((parse_mr(row[0]), row[1].strip()))
        except ValueError as err:
            raise ValueError(f"{file} row {line}: {err}") from err
    return pairs


def load_e2e(
    folder: str | Path | None = None, splits: Sequence[Literal["dev", "test"]] = ("dev", "test")
) -> list[tuple[dict[str, str], str]]:
    """E2E (Novikova et al. 2017) ``(parsed MR, sentence)`` pairs: 4,672 dev + 4,693 test, in file order.

    The folder is ``folder``, else ``$UNNOISE_E2E``, else ``../shared/data/e2e`` beside the repository.
    """
    if isinstance(splits, str) or not splits or any(s not in E2E_FILES for s in splits):
        raise ValueError(f"splits must be a non-empty sequence of {', '.join(map(repr, E2E_FILES))}; got {splits!r}")
    where = _e2e_folder(folder)
    pairs = []
    for split in splits:
        file = where / E2E_FILES[split]
        if not file.is_file():
            raise FileNotFoundError(f"E2E {split} split {file} not found: pass folder= or set UNNOISE_E2E")
        pairs += _read_e2e_csv(file)
    return pairs


def split_by_mr(
    pairs: Sequence[tuple[dict[str, str], str]], held_out: float = 0.1, seed: int = 0
) -> tuple[list[tuple[dict[str, str], str]], list[tuple[dict[str, str], str]]]:
    """Split pairs into (train, held-out) by whole MRs: ``ceil(held_out * #MRs)`` distinct MRs are held out.

    An MR is compared exactly, as ``frozenset(mr.items())``; the split depends only on the pairs and
    ``seed`` (not on hashing), and each part keeps the input order.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction strictly between 0 and 1; got {held_out!r}")
    keys = sorted({tuple(sorted(mr.items())) for mr, _ in pairs})
    if len(keys) < 2:
        raise ValueError(f"split_by_mr needs pairs with at least 2 distinct MRs; got {len(keys)}")
    random.Random(seed).shuffle(keys)
    n_out = min(len(keys) - 1, math.ceil(held_out * len(keys)))
    out = {frozenset(k) for k in keys[:n_out]}
    train = [p for p in pairs if frozenset(p[0].items()) not in out]
    return train, [p for p in pairs if frozenset(p[0].items()) in out]


def load_lines(path: str | Path) -> list[str]:
    """A UTF-8 text file, one sentence per line -> the non-blank lines, stripped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {file} does not exist or is not a file")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not valid UTF-8 (byte {err.start}): text files must be UTF-8") from err
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"text file {file} holds no sentences: expected one sentence per line")
    return lines


_WORD = re.compile(r"\w+|[^\w\s]")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<end>")  # ids 0, 1, 2; tokenize() never yields them (it splits '<')


def tokenize(sentence: str) -> list[str]:
    """Lowercase, then words (``\\w+``) and single punctuation marks: ``"It's £20."`` -> it ' s £ 20 ."""
    return _WORD.findall(sentence.lower())


class Tokenizer:
    """Word-level tokenizer: ``<pad>`` = 0, ``<unk>`` = 1, ``<end>`` = 2, then words.

    ``encode`` gives the words, one ``<end>``, then ``<pad>`` up to ``length``; a sentence too long keeps
    its first ``length - 1`` words and still ends in ``<end>``. ``decode`` stops at ``<end>``, drops
    ``<pad>`` and joins words with single spaces, so ``decode(encode(s))`` is ``" ".join(tokenize(s))``.
    """

    pad_id, unk_id, end_id = 0, 1, 2

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if tuple(vocab[:3]) != SPECIAL_TOKENS or len(set(vocab)) != len(vocab):
            raise ValueError(f"vocab must start with {', '.join(SPECIAL_TOKENS)} and hold no duplicates")
        self.vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def build(cls, sentences: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Vocabulary of the words seen ``min_count`` times or more, by descending count (ties alphabetical)."""
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive int; got {min_count!r}")
        counts = Counter(w for s in sentences for w in tokenize(s))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *words])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, sentence: str, length: int) -> Tensor:
        """Sentence -> long ``(length,)``: word ids (``<unk>`` if unseen), ``<end>``, ``<pad>``..."""
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int (room for at least <end>); got {length!r}")
        ids = [self._ids.get(w, self.unk_id) for w in tokenize(sentence)][: length - 1] + [self.end_id]
        return torch.tensor(ids + [self.pad_id] * (length - len(ids)), dtype=torch.long)

    def encode_batch(self, sentences: Sequence[str], length: int) -> Tensor:
        """Sentences -> long ``(N, length)``, each row as ``encode``."""
        if not sentences:
            raise ValueError("encode_batch needs at least one sentence")
        return torch.stack([self.encode(s, length) for s in sentences])

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Ids ``(L,)`` -> text: up to the first ``<end>``, ``<pad>`` dropped, ``<unk>`` kept as the word."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if any(not isinstance(i, int) for i in ids):
            raise ValueError("decode needs one sequence of int ids (L,); for a batch, decode each row")
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1} (the vocabulary); got {ids}")
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return " ".join(self.vocab[i] for i in ids if i != self.pad_id)

    def to_json(self) -> str:
        """The vocabulary as JSON text, to save beside a checkpoint (no pickle)."""
        return json.dumps({"type": "word", "vocab": self.vocab}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Inverse of ``to_json``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"tokenizer JSON is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("type") != "word" or not isinstance(data.get("vocab"), list):
            raise ValueError('tokenizer JSON must be {"type": "word", "vocab": [...]} as written by to_json()')
        return cls(data["vocab"])
