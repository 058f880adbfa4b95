"""Text-to-image latent diffusion (issue 17), work in progress: not yet registered in modalities.base.REGISTRY.

So far: the fashion-scenes data set with its captions and prompt parser (:mod:`.captions`, :mod:`.data`).
"""
