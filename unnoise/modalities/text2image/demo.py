"""``unnoise demo text2image``: a VAE, then latent diffusion from prompts, on fashion-scenes, in minutes on a CPU.

Writes OUT/vae (the VAE run), OUT/run (the text2image run) and OUT/prompts.png: each prompt beside
the images drawn for it (classifier-free guided). Small on purpose (few scenes and steps): it shows
the pipeline end to end, not the quality that longer training reaches.
"""

from __future__ import annotations

import time
from pathlib import Path

from unnoise.modalities.run import load_run, make_config, train
from unnoise.modalities.text2image.io import save_prompt_panel
from unnoise.modalities.text2image.pipeline import sample_text2image
from unnoise.modalities.text2image.vae_run import evaluate_vae, train_vae, vae_settings

PROMPTS = (
    "a bag in the top left",
    "an ankle boot at the lower right",
    "a trouser in the top right and a sneaker in the bottom left",
    "top-left: dress; bottom-right: sandal",
)


def run_text2image_demo(out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """Train the VAE (``3 * steps // 8`` steps) and the latent model (``steps``, default 400) on 4,000 scenes."""
    steps = steps or 400
    start = time.perf_counter()
    settings = {"steps": max(1, 3 * steps // 8), "seed": seed, "save_every": 1000, "extra": {"scenes": 4000}}
    vae = train_vae(vae_settings(settings), out / "vae")
    vae_s = time.perf_counter() - start
    cfg = make_config(
        "text2image",
        {"steps": steps, "seed": seed, "save_every": 1000, "lr": 2e-3, "ema_decay": 0.99}
        | {"extra": {"vae": str(out / "vae"), "scenes": 4000}},
    )
    train("text2image", cfg, out / "run")
    train_s = time.perf_counter() - start - vae_s
    run = load_run(out / "run")
    images, prompts = sample_text2image(run, list(PROMPTS), n=4 * len(PROMPTS), guidance=3.0, seed=seed)
    panel = save_prompt_panel(out / "prompts.png", images, prompts)
    print(f"trained the VAE ({settings['steps']} steps) in {vae_s:.0f} s: {evaluate_vae(out / 'vae', n=200)[0]}")
    print(f"trained the latent model ({steps} steps) in {train_s:.0f} s; wrote {panel} (guidance 3)")
    return {"vae_seconds": vae_s, "train_seconds": train_s, "latent_scale_factor": vae.scale_factor}
