"""The prompt encoder: vocabulary, one-line refusals of bad prompts, masking, and its use as U-Net context."""

import pytest
import torch

from unnoise.modalities.text2image.captions import TEMPLATES, Scene, caption
from unnoise.nets.text_encoder import (
    NULL,
    PAD,
    UNK,
    TextEncoder,
    TextEncoderConfig,
    Vocabulary,
    check_prompt,
    rotary,
)
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.schema import from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def scene_vocab() -> Vocabulary:
    scenes = [Scene(tuple(c if i == j else None for i in range(4))) for c in range(10) for j in range(4)]
    scenes += [Scene((c, None, None, 9 - c)) for c in range(10)] + [Scene((c, 1, None, 2)) for c in range(10)]
    return Vocabulary.build(caption(s, t) for s in scenes for t in TEMPLATES)


def encoder(vocab: Vocabulary, **kw) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(len(vocab), **(dict(max_len=16, width=16, depth=2, heads=2) | kw))).eval()


def test_tokens_and_vocabulary():
    assert Vocabulary.tokenize("Top-left: T-shirt/top; an Ankle boot, bag.") == [
        "top-left", ":", "t-shirt/top", ";", "an", "ankle", "boot", ",", "bag"
    ]  # fmt: skip
    vocab = scene_vocab()
    assert vocab.words[:3] == ("<pad>", "<unk>", "<null>") and list(vocab.words[3:]) == sorted(vocab.words[3:])
    assert {"t-shirt/top", "sneaker", "upper", "corner", ":", ";"} <= set(vocab.words)
    assert Vocabulary.build(["b a", "a c"], min_count=2).words == ("<pad>", "<unk>", "<null>", "a")
    text = caption(Scene((0, None, 9, 6)), "natural")
    ids = vocab.encode(text, max_len=32)
    assert [vocab.words[i] for i in ids] == Vocabulary.tokenize(text) and UNK not in ids
    assert vocab.encode("a hat in the top left", 32)[1] == UNK and vocab.unknown("a hat in the top left") == ["hat"]


def test_batches_pad_and_none_is_the_null_prompt():
    vocab = scene_vocab()
    ids, mask = vocab.batch(["a bag in the top left", None, "top-left: bag; bottom-right: coat"], max_len=16)
    assert ids.shape == mask.shape == (3, 7) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6, 1, 7] and ids[1, 0] == NULL and (ids[~mask] == PAD).all()


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "empty prompt"),
        ("   \n", "empty prompt"),
        (b"a bag \xff in the top left", "not UTF-8: byte 0xff at position 6"),
        ("a bag \udcff in the top left", "not UTF-8"),  # how sys.argv carries an undecodable byte
        ("?!", "holds no words"),
        (" ".join(["bag"] * 17), "17 tokens long; the text encoder takes at most 16"),
    ],
)
def test_bad_prompts_are_refused_in_one_line(prompt, match):
    with pytest.raises(ValueError, match=match) as err:
        scene_vocab().batch(["a bag in the top left", prompt], max_len=16)
    assert "\n" not in str(err.value)


def test_check_prompt_decodes_utf8_bytes():
    assert check_prompt("é".encode()) == "é" and check_prompt("a bag") == "a bag"


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_features_shape_zero_padding_and_padding_changes_nothing(positions):
    vocab = scene_vocab()
    enc = encoder(vocab, positions=positions)
    ids, mask = vocab.batch(["a bag in the top left", "a coat at the upper right and a bag at the lower left"], 16)
    feats = enc(ids, mask)
    assert feats.shape == (2, ids.shape[1], 16) and (feats[~mask] == 0).all()
    # the first prompt alone (no padding) has the same features on its real tokens
    alone, alone_mask = vocab.batch(["a bag in the top left"], 16)
    torch.testing.assert_close(enc(alone, alone_mask)[0], feats[0, : alone.shape[1]], atol=1e-5, rtol=1e-5)
    # and padding ids are ignored whatever they are
    garbage = torch.where(mask, ids, torch.randint(3, len(vocab), ids.shape))
    torch.testing.assert_close(enc(garbage, mask), feats)


def test_different_prompts_and_positions_give_different_features():
    vocab = scene_vocab()
    enc = encoder(vocab)
    a, m = vocab.batch(["a bag in the top left", "a bag in the top right", None], 16)
    f = enc(a, m)
    assert not torch.allclose(f[0], f[1], atol=1e-4)
    assert torch.isfinite(f[2]).all() and f[2, 0].abs().sum() > 0  # the null prompt is a real token


def test_rotary_scores_depend_on_offsets_alone_and_match_the_papers_pairs():
    g = torch.Generator().manual_seed(0)
    L, d = 9, 8
    u, w = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    q, k = rotary(u.expand(L, d)), rotary(w.expand(L, d))
    scores = q @ k.T  # the same query and key at every position: S[m, n] may depend on m - n only
    for offset in range(-L + 1, L):
        diagonal = scores.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.norm(dim=-1), u.norm().expand(L))  # a rotation
    torch.testing.assert_close(q[0], u)  # position 0 is not rotated
    # RoFormer eq. 34 rotates neighbours (x_2i, x_2i+1) by m theta_i, theta_i = 10000^(-2i/d); ours pairs
    # (x_i, x_i+d/2): the same map after interleaving the two halves
    x = torch.randn(L, d, generator=g, dtype=torch.float64)
    theta = 10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta
    even, odd = x[:, : d // 2], x[:, d // 2 :]  # interleaved: x'_2i = x_i, x'_2i+1 = x_i+d/2
    paper = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1)
    ours = rotary(x)
    torch.testing.assert_close(torch.stack([ours[:, : d // 2], ours[:, d // 2 :]], -1), paper)


def test_rotary_encoder_has_no_absolute_positions_but_sees_word_order():
    vocab = scene_vocab()
    enc = encoder(vocab, positions="rotary")
    assert enc.position is None and not any("position" in name for name, _ in enc.named_parameters())
    ids, mask = vocab.batch(["bag coat", "coat bag"], 16)
    f = enc(ids, mask)
    assert not torch.allclose(f[0, 0], f[1, 1], atol=1e-4)  # "bag" before or after "coat"


def test_bad_encoder_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown text encoder positions 'sinusoidal'; allowed: learned, rotary"):
        TextEncoderConfig(10, positions="sinusoidal")
    with pytest.raises(ValueError, match="even head width"):
        TextEncoderConfig(10, width=12, heads=4, positions="rotary")
    with pytest.raises(ValueError, match="split into heads"):
        TextEncoderConfig(10, width=10, heads=3)
    with pytest.raises(ValueError, match="exceed the 3 special tokens"):
        TextEncoderConfig(3)
    with pytest.raises(ValueError, match="unknown settings layers"):
        from_dict(TextEncoderConfig, {"vocab_size": 10, "layers": 2}, "config.json 'text_encoder'")
    enc = encoder(scene_vocab(), max_len=4)
    with pytest.raises(ValueError, match="at least one real token"):
        enc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most 4"):
        enc(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for"):
        enc.encode_prompts(Vocabulary.build(["a b"]), ["a"])


def test_the_unet_trains_the_encoder_through_cross_attention():
    """Joint training (LDM's tau_theta): a denoising loss on the U-Net reaches every encoder parameter."""
    vocab = scene_vocab()
    enc = encoder(vocab).train()
    cfg = UNetConfig(8, 4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     num_heads=2, dropout=0.0, context_dim=16)  # fmt: skip
    net = UNet(cfg)
    with torch.no_grad():  # move the zero-initialised layers off zero so gradients reach the context
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context, mask = enc.encode_prompts(vocab, ["a bag in the top left", None, "top-left: coat; bottom-right: shirt"])
    x = torch.randn(3, 4, 8, 8)
    net(x, torch.rand(3), context=context, context_mask=mask).square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
