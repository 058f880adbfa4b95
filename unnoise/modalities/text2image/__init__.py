"""Text-to-image latent diffusion (issue 17), work in progress: not yet registered in modalities.base.REGISTRY.

So far: the fashion-scenes data set with its captions and prompt parser (:mod:`.captions`, :mod:`.data`);
the prompt-following metric with its cell classifier (:mod:`.metrics`); prompts as condition ids, the
text-conditioned U-Net and the latent codec (:mod:`.pipeline`). The networks are
:mod:`unnoise.nets.vae`, :mod:`unnoise.nets.text_encoder` and the U-Net's ``context_dim``.
"""
