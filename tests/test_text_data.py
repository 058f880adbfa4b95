"""Text data: E2E meaning representations and pairs, MR-disjoint splits, plain-text files, the tokenizer."""

import json
from pathlib import Path

import pytest
import torch

from unnoise.modalities.text import data as text_data
from unnoise.modalities.text.data import (
    E2E_ATTRIBUTES,
    SPECIAL_TOKENS,
    TINY_CORPUS,
    Tokenizer,
    load_e2e,
    load_lines,
    parse_mr,
    split_by_mr,
    tokenize,
)


@pytest.fixture(scope="module")
def e2e():
    try:
        return load_e2e()
    except FileNotFoundError as err:
        pytest.skip(f"E2E data not available: {err}")


# ----------------------------------------------------------------------------- meaning representations


def test_parse_mr_real_rows():
    assert parse_mr("name[Alimentum], area[city centre], familyFriendly[no]") == {
        "name": "Alimentum",
        "area": "city centre",
        "familyFriendly": "no",
    }
    mr = parse_mr(
        "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]"
    )
    assert mr["priceRange"] == "more than £30" and mr["customer rating"] == "5 out of 5"
    assert mr["near"] == "Café Adriatic" and list(mr) == ["name", "eatType", "priceRange", "customer rating", "near"]


@pytest.mark.parametrize(
    "bad",
    ["", "name[Alimentum", "name Alimentum", "name[Alimentum] area[riverside]", "name[]", "name[A], , area[b]"],
)
def test_parse_mr_malformed(bad):
    with pytest.raises(ValueError, match="meaning representation"):
        parse_mr(bad)


def test_parse_mr_unknown_or_repeated_attribute():
    with pytest.raises(ValueError, match="unknown attribute 'colour'.*allowed: name"):
        parse_mr("name[A], colour[red]")
    with pytest.raises(ValueError, match="appears twice"):
        parse_mr("name[A], name[B]")


# ----------------------------------------------------------------------------- E2E pairs


def test_load_e2e_counts_and_every_mr_parses(e2e):
    assert len(load_e2e(splits=("dev",))) == 4672
    assert len(load_e2e(splits=["test"])) == 4693
    assert len(e2e) == 4672 + 4693
    for mr, ref in e2e:
        assert "name" in mr and set(mr) <= set(E2E_ATTRIBUTES) and ref
    assert len({frozenset(mr.items()) for mr, _ in e2e}) == 547 + 630
    assert any("£" in mr.get("priceRange", "") for mr, _ in e2e)


def test_load_e2e_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("UNNOISE_E2E", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*UNNOISE_E2E"):
        load_e2e()
    with pytest.raises(FileNotFoundError, match="missing.*folder="):
        load_e2e(folder=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="dev split .*devset.csv not found"):
        load_e2e(folder=tmp_path)
    with pytest.raises(ValueError, match="splits must be"):
        load_e2e(splits=("train",))


def test_load_e2e_bad_files(tmp_path):
    (tmp_path / "devset.csv").write_bytes(b'mr,ref\n"name[A]","caf\xe9 bad"\n')
    with pytest.raises(ValueError, match="devset.csv is not valid UTF-8"):
        load_e2e(tmp_path, splits=("dev",))
    (tmp_path / "devset.csv").write_text('mr,ref\n"name[A], colour[red]","A is red."\n', encoding="utf-8")
    with pytest.raises(ValueError, match="devset.csv row 2: unknown attribute"):
        load_e2e(tmp_path, splits=("dev",))
    (tmp_path / "devset.csv").write_text('"mr","ref"\n"name[A], area[riverside]","A is by the river."\n')
    assert load_e2e(tmp_path, splits=("dev",)) == [({"name": "A", "area": "riverside"}, "A is by the river.")]


def test_split_by_mr_disjoint_and_deterministic(e2e):
    train, held = split_by_mr(e2e, held_out=0.1, seed=0)
    assert len(train) + len(held) == len(e2e)
    train_mrs = {frozenset(mr.items()) for mr, _ in train}
    held_mrs = {frozenset(mr.items()) for mr, _ in held}
    assert not train_mrs & held_mrs
    assert len(held_mrs) == 118  # ceil(0.1 * 1177)
    assert split_by_mr(e2e, held_out=0.1, seed=0) == (train, held)
    assert split_by_mr(list(reversed(e2e)), 0.1, 0)[1] == list(reversed(held))  # MR choice ignores order
    assert split_by_mr(e2e, held_out=0.1, seed=1)[1] != held
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_by_mr(e2e, held_out=1.0)
    with pytest.raises(ValueError, match="at least 2 distinct MRs"):
        split_by_mr(e2e[:1])


# ----------------------------------------------------------------------------- plain text


def test_load_lines(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("the cafe is near the river .\n\n  the pub is old .  \n", encoding="utf-8")
    assert load_lines(f) == ["the cafe is near the river .", "the pub is old ."]
    f.write_text("\n  \n")
    with pytest.raises(ValueError, match="s.txt holds no sentences"):
        load_lines(f)
    f.write_bytes(b"the caf\xff is near\n")
    with pytest.raises(ValueError, match="s.txt is not valid UTF-8"):
        load_lines(f)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_lines(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenize_splits_punctuation():
    assert tokenize("Blue Spice is a family-friendly café, £20-25.") == [
        "blue", "spice", "is", "a", "family", "-", "friendly", "café", ",", "£", "20", "-", "25", ".",
    ]  # fmt: skip


def test_tokenizer_vocab_order_and_special_ids():
    tok = Tokenizer.build(["b a a .", "c b a ."], min_count=1)
    assert tok.vocab[:3] == list(SPECIAL_TOKENS) and (tok.pad_id, tok.unk_id, tok.end_id) == (0, 1, 2)
    assert tok.vocab[3:] == ["a", ".", "b", "c"]  # a: 3, then '.' and b tie at 2 (alphabetical), c: 1
    assert Tokenizer.build(["b a a .", "c b a ."], min_count=2).vocab[3:] == ["a", ".", "b"]


def test_tokenizer_round_trip_unk_and_padding():
    tok = Tokenizer.build(TINY_CORPUS)
    for s in TINY_CORPUS:
        ids = tok.encode(s, 16)
        assert ids.dtype == torch.long and ids.shape == (16,)
        assert tok.decode(ids) == " ".join(tokenize(s)) == s
        n = len(tokenize(s))
        assert ids[n] == tok.end_id and (ids[n + 1 :] == tok.pad_id).all() and (ids[:n] > tok.end_id).all()
    ids = tok.encode("The Zebra is near the river.", 10)
    assert ids[1] == tok.unk_id and tok.decode(ids) == "the <unk> is near the river ."
    assert tok.decode(tok.encode("the cafe is near the river .", 4)) == "the cafe is"  # truncated, <end> kept
    assert tok.encode("the cafe", 4)[-1] == tok.pad_id and tok.encode("the cafe is near", 3)[-1] == tok.end_id
    assert tok.encode_batch(TINY_CORPUS[:5], 12).shape == (5, 12)
    assert tok.decode([3, 2, 4, 5]) == tok.vocab[3]  # stops at <end>
    with pytest.raises(ValueError, match="length must be a positive int"):
        tok.encode("the cafe", 0)
    with pytest.raises(ValueError, match="token ids must lie in 0"):
        tok.decode([tok.vocab_size])


def test_tokenizer_json_round_trip(tmp_path):
    tok = Tokenizer.build(["Le café coûte £20 ."] + TINY_CORPUS)
    f = tmp_path / "tokenizer.json"
    f.write_text(tok.to_json(), encoding="utf-8")
    back = Tokenizer.from_json(f.read_text(encoding="utf-8"))
    assert back.vocab == tok.vocab and back.vocab_size == tok.vocab_size
    assert torch.equal(back.encode("le café coûte £20 .", 8), tok.encode("le café coûte £20 .", 8))
    with pytest.raises(ValueError, match="to_json"):
        Tokenizer.from_json(json.dumps({"vocab": "abc"}))
    with pytest.raises(ValueError, match="must start with <pad>"):
        Tokenizer(["a", "b"])


def test_tokenizer_on_e2e(e2e):
    tok = Tokenizer.build(ref for _, ref in e2e)
    assert 1000 <= tok.vocab_size <= 3000
    assert {".", "the", "is"} <= set(tok.vocab[3:13])  # the most frequent words come first
    ref = e2e[0][1]
    assert tok.decode(tok.encode(ref, 64)) == " ".join(tokenize(ref))


def test_tiny_corpus_tokenizes():
    assert 50 <= len(TINY_CORPUS) <= 80 and len(set(TINY_CORPUS)) == len(TINY_CORPUS)
    tok = Tokenizer.build(TINY_CORPUS)
    assert 50 <= tok.vocab_size <= 300
    lengths = [len(tokenize(s)) for s in TINY_CORPUS]
    assert max(lengths) <= 12 and all(s == s.lower() for s in TINY_CORPUS)
    assert not any((tok.encode_batch(TINY_CORPUS, 16) == tok.unk_id).any(dim=1))
    assert text_data.TINY_CORPUS is TINY_CORPUS


def test_the_default_e2e_folder_is_the_shared_folder_beside_the_checkout():
    """E2E is read from ../shared/data/e2e next to the repository, wherever the module sits in the package."""
    import unnoise

    checkout = Path(unnoise.__file__).resolve().parents[1]
    assert text_data._E2E_DEFAULT.resolve() == (checkout.parent / "shared" / "data" / "e2e").resolve()
