"""Text-to-image latent diffusion (issue 17), registered as the ``text2image`` modality (:mod:`.modality`).

The fashion-scenes data set with its captions and prompt parser (:mod:`.captions`, :mod:`.data`); VAE
runs (:mod:`.vae_run`, ``unnoise train vae``); prompts as condition ids, the text-conditioned U-Net,
the latent codec and sampling (:mod:`.pipeline`); the prompt-following metric with its cached cell
classifier (:mod:`.metrics`); writers (:mod:`.io`); the demo (:mod:`.demo`). The networks are
:mod:`unnoise.nets.vae`, :mod:`unnoise.nets.text_encoder` and the U-Net's ``context_dim``.
"""
