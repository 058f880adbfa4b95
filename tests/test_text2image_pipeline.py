"""Prompts as condition ids, the text-conditioned U-Net, guidance with negative prompts, and the latent codec."""

import pytest
import torch
from test_text_encoder import scene_vocab

from unnoise.guidance import classifier_free
from unnoise.modalities.image.data import to_model, to_uint8
from unnoise.modalities.text2image.pipeline import LatentCodec, TextToImageNet, null_ids, prompt_ids
from unnoise.nets.text_encoder import NULL, PAD, TextEncoder, TextEncoderConfig
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.nets.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def text_net(width: int = 16) -> TextToImageNet:
    vocab = scene_vocab()
    enc = TextEncoder(TextEncoderConfig(len(vocab), max_len=24, width=16, depth=1, heads=2))
    cfg = UNetConfig(8, 4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     num_heads=2, dropout=0.0, context_dim=width)  # fmt: skip
    unet = UNet(cfg)
    with torch.no_grad():  # off the zero init, so the prompt matters
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return TextToImageNet(enc, unet).eval()


PROMPTS = ["a bag in the top left", "top-left: coat; bottom-right: shirt", "an ankle boot at the upper right"]


def test_prompt_ids_share_one_shape_and_the_null_row():
    vocab = scene_vocab()
    ids = prompt_ids(vocab, [*PROMPTS, None], max_len=12)
    assert ids.shape == (4, 12) and ids.dtype == torch.long
    assert torch.equal(ids[3], null_ids(12)) and null_ids(3).tolist() == [NULL, PAD, PAD]
    assert (ids[0, 6:] == PAD).all() and (ids[0, :6] != PAD).all()
    with pytest.raises(ValueError, match="at most 5"):
        prompt_ids(vocab, PROMPTS, max_len=5)
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_ids(vocab, [""], max_len=5)


def test_the_net_depends_on_the_prompt_not_on_its_padding():
    net, vocab = text_net(), scene_vocab()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3) * 10
    out = net(x, t, prompt_ids(vocab, PROMPTS, 12))
    assert out.shape == x.shape
    torch.testing.assert_close(net(x, t, prompt_ids(vocab, PROMPTS, 24)), out)
    other = net(x, t, prompt_ids(vocab, PROMPTS[::-1], 12))
    assert not torch.allclose(out[0], other[0], atol=1e-4)
    null = net(x, t, null_ids(12).expand(3, 12))
    torch.testing.assert_close(net(x, t), null)  # None is the null prompt
    with pytest.raises(ValueError, match="context_dim"):
        text_net(width=8)
    with pytest.raises(ValueError, match="prompt ids must be long"):
        net(x, t, torch.zeros(2, 4, dtype=torch.long))


def test_guidance_with_a_negative_prompt_is_cfg_whose_null_is_the_negative_prompt():
    net, vocab = text_net(), scene_vocab()
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor(2.0)
    cond = prompt_ids(vocab, PROMPTS, 12)
    negative = prompt_ids(vocab, ["a bag in the bottom right"], 12)  # one row, shared by the batch
    with torch.no_grad():
        guided = classifier_free(net, cond, negative, scale=4.0)(x, sigma)
        d_c, d_neg = net(x, sigma, cond), net(x, sigma, negative.expand(3, 12))
        torch.testing.assert_close(guided, d_neg + 4.0 * (d_c - d_neg), atol=1e-5, rtol=1e-5)
        plain = classifier_free(net, cond, null_ids(12), scale=4.0)(x, sigma)
        d_u = net(x, sigma, null_ids(12).expand(3, 12))
        torch.testing.assert_close(plain, d_u + 4.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(guided, plain, atol=1e-4)


def test_the_latent_codec_scales_the_posterior_mean_and_decodes_to_pixels():
    vae = AutoencoderKL(VAEConfig.preset("tiny", image_size=8)).eval()
    codec = LatentCodec(vae, scale_factor=0.5)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    mean, logvar = vae.encode(to_model(images))
    z = codec.encode(images)
    torch.testing.assert_close(z, 0.5 * mean)
    decoded = codec.decode(z)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, to_uint8(vae.decode(mean)))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(codec.encode(images, sample=True, generator=g1), codec.encode(images, sample=True, generator=g2))
    with pytest.raises(ValueError, match="scale_factor"):
        LatentCodec(vae, 0.0)
