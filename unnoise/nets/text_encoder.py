"""A small text encoder for prompts: a word-level vocabulary and a bidirectional transformer trained jointly.

Latent diffusion conditions its U-Net on the per-token features of a prompt through cross-attention
(Rombach et al. 2022, sec. 3.3: ``tau_theta(y)`` of shape ``(B, L, d_tau)``; LDM's text-to-image model
trains its transformer ``tau_theta`` jointly with the U-Net). Here:

    prompt -> words (lower case; ":" ";" "," kept as tokens) -> ids (B, L) with a padding mask (B, L)
           -> token embedding (+ learned position) -> [pre-LN self-attention (rotary positions
              instead, if so configured), pre-LN MLP] x depth
           -> LayerNorm -> features (B, L, width), zero at padded positions

The vocabulary is built from training captions (:meth:`Vocabulary.build`); id 0 pads, 1 stands for an
unknown word and 2 is the null prompt ``[<null>]`` that classifier-free guidance trains and samples
with (Ho & Salimans 2021): one real token, so attention never runs over an empty row. A prompt that
cannot be encoded (not UTF-8, empty, longer than ``max_len`` tokens) is a ValueError of one line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NULL", "PAD", "UNK", "TextEncoder", "TextEncoderConfig", "Vocabulary", "check_prompt", "rotary"]

PAD, UNK, NULL = 0, 1, 2
Positions = Literal["learned", "rotary"]
POSITIONS: tuple[str, ...] = get_args(Positions)
SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<null>")
# a word: letters/digits, joined by - / ' (t-shirt/top, top-left); or one of the punctuation marks captions use
_TOKEN = re.compile(r"[^\W_]+(?:['/-][^\W_]+)*|[:;,]")


def check_prompt(text: str | bytes) -> str:
    """A prompt as a str, or a ValueError of one line: bytes that are not UTF-8, a str that cannot be
    UTF-8 (lone surrogates, as ``sys.argv`` carries undecodable bytes), or nothing but white space."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the prompt is not UTF-8: byte 0x{text[err.start]:02x} at position {err.start}") from None
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be text; got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the prompt is not UTF-8: undecodable character at position {err.start}") from None
    if not text.strip():
        raise ValueError("empty prompt: describe the image in words")
    return text


@dataclass(frozen=True)
class Vocabulary:
    """Word-level vocabulary: ``words[i]`` is the word of id i; ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<null>``."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        if self.words[: len(SPECIALS)] != SPECIALS or len(set(self.words)) != len(self.words):
            raise ValueError(f"a vocabulary starts with {SPECIALS} and lists each word once")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Every word seen at least ``min_count`` times in ``captions``, sorted (so the ids are reproducible)."""
        counts = Counter(w for text in captions for w in cls.tokenize(check_prompt(text)))
        return cls(SPECIALS + tuple(sorted(w for w, n in counts.items() if n >= min_count)))

    @staticmethod
    def tokenize(text: str) -> list[str]:
        """``"Top-left: T-shirt/top; bag."`` -> ``["top-left", ":", "t-shirt/top", ";", "bag"]``."""
        return _TOKEN.findall(text.lower())

    def __len__(self) -> int:
        return len(self.words)

    @cached_property
    def index(self) -> dict[str, int]:
        """word -> id."""
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str | bytes, max_len: int) -> list[int]:
        """Token ids of one prompt, unknown words as ``UNK``; one-line ValueError if it cannot be encoded."""
        words = self.tokenize(check_prompt(text))
        if not words:
            raise ValueError(f"the prompt {text!r} holds no words (letters or digits)")
        if len(words) > max_len:
            raise ValueError(f"the prompt is {len(words)} tokens long; the text encoder takes at most {max_len}")
        index = self.index
        return [index.get(w, UNK) for w in words]

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` that are not in the vocabulary (they would be encoded as ``<unk>``)."""
        index = self.index
        return [w for w in self.tokenize(text) if w not in index]

    def batch(self, prompts: Sequence[str | bytes | None], max_len: int) -> tuple[Tensor, Tensor]:
        """Prompts -> ids long ``(B, L)`` padded with ``PAD``, mask bool ``(B, L)`` (True: a real token).

        ``None`` is the null prompt ``[<null>]``; ``L`` is the longest prompt's length.
        """
        if not len(prompts):
            raise ValueError("no prompts to encode")
        rows = [[NULL] if p is None else self.encode(p, max_len) for p in prompts]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_len: int = 48  # the most tokens per prompt (learned positions); the longest fashion-scenes caption has 38
    width: int = 64  # feature size: the U-Net's context_dim
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    # "learned": an absolute position vector added to each token (BERT); "rotary": queries and keys
    # rotated by their position (RoPE, Su et al. 2021), so attention scores see only relative offsets
    positions: Positions = "learned"

    def __post_init__(self):
        if self.vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens, got {self.vocab_size}")
        if min(self.max_len, self.width, self.depth, self.heads, self.mlp_ratio) < 1:
            raise ValueError(f"max_len, width, depth, heads and mlp_ratio must be >= 1, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} does not split into heads={self.heads} attention heads")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown text encoder positions {self.positions!r}; allowed: {', '.join(POSITIONS)}")
        if self.positions == "rotary" and (self.width // self.heads) % 2:
            raise ValueError(f"rotary positions need an even head width, got {self.width} / {self.heads} heads")


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE (Su et al. 2021, eq. 34): rotate feature pairs of the token at position m by the angles
    ``m base^(-2i/d)``, i < d/2. ``x`` ``(..., L, d)``, d even -> same shape. Then ``<rotary(q)_m,
    rotary(k)_n>`` depends on m - n alone: a head can attend to "the next two words" wherever they are.
    Pairs are ``(x_i, x_{i + d/2})`` (GPT-NeoX's layout); the paper's neighbours ``(x_2i, x_2i+1)`` are
    the same up to a fixed permutation of features, which the projections before it absorb.
    """
    L, d = x.shape[-2:]
    freqs = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float64) * 2 / d)
    angles = torch.arange(L, device=x.device, dtype=torch.float64)[:, None] * freqs  # (L, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Block(nn.Module):
    """Pre-LN transformer block: ``h + SelfAttention(LN(h))`` (padded keys masked), then ``h + MLP(LN(h))``."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.qkv, self.proj = (
            nn.LayerNorm(cfg.width),
            nn.Linear(cfg.width, 3 * cfg.width),
            nn.Linear(cfg.width, cfg.width),
        )
        self.norm2 = nn.LayerNorm(cfg.width)
        hidden = cfg.mlp_ratio * cfg.width
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary = cfg.positions == "rotary"

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        B, L, C = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = rotary(q), rotary(k)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, heads, L, C/heads)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, C)))
        return h + self.drop(self.mlp(self.norm2(h)))


class TextEncoder(nn.Module):
    """LDM's ``tau_theta``: ids ``(B, L)`` and mask ``(B, L)`` -> features ``(B, L, width)``, zero where padded."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.token = nn.Embedding(cfg.vocab_size, cfg.width)
        learned = cfg.positions == "learned"
        self.position = nn.Parameter(torch.randn(cfg.max_len, cfg.width) * 0.02) if learned else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if ids.ndim != 2 or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"need ids (B, L) and a bool mask of the same shape; got {tuple(ids.shape)}, {mask.dtype}")
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{ids.shape[1]} tokens per prompt; the text encoder takes at most {self.config.max_len}")
        if not mask.any(dim=1).all():
            raise ValueError("every prompt needs at least one real token (the null prompt is [<null>])")
        h = self.token(ids)  # (B, L, width)
        if self.position is not None:
            h = h + self.position[: ids.shape[1]]
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h) * mask[..., None].to(h.dtype)

    def encode_prompts(self, vocab: Vocabulary, prompts: Sequence[str | bytes | None]) -> tuple[Tensor, Tensor]:
        """``(context, mask)`` for the U-Net's cross-attention: ``(B, L, width)`` and bool ``(B, L)``."""
        if len(vocab) != self.config.vocab_size:
            raise ValueError(
                f"the vocabulary has {len(vocab)} words; this encoder was built for {self.config.vocab_size}"
            )
        ids, mask = vocab.batch(prompts, self.config.max_len)
        device = self.token.weight.device
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask
