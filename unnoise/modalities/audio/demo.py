"""``unnoise demo audio``: a class-conditional waveform U-Net on synthesised spoken digits, in minutes.

Synthesises the spoken digits once (espeak-ng / flite, about 700 clips at 8 kHz), trains the
"small" waveform U-Net (unnoise.modalities.audio.pipeline) for a few minutes, draws one clip per digit with
classifier-free guidance, and writes RUN (the run folder), digit_<d>.wav and spectrograms.png.
It prints what the spoken-digit classifier hears in the clips and the real-time factor of
generation. ``benchmarks/audio.py`` trains longer and scores the result on 100 clips per setting.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from unnoise.denoisers import native_bf16
from unnoise.modalities.audio.io import save_spectrogram_grid, save_wav
from unnoise.modalities.audio.pipeline import load_audio_run, sample_audio
from unnoise.modalities.run import make_config, train

GUIDANCE = 4.0  # classifier-free guidance: on a briefly trained model, 4 says the digit far more clearly than 2
NFE = 10  # unipc at 10 NFE: as accurate as 20 in benchmarks/audio.py, at half the time


def run_audio_demo(out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
    cfg = make_config(
        "audio",
        dict(
            data="spoken-digits",
            model="small",
            schedule="diffwave",
            T=200,
            steps=steps or 200,
            batch_size=16,
            lr=1e-3,
            warmup=20,
            seed=seed,
            save_every=10**6,
            log_every=10,
            ema_decay=0.99,
            bf16=native_bf16(),  # bf16 where the CPU has it natively; emulated it is far slower
            extra={"arch": "unet"},
        ),
    )
    start = time.perf_counter()
    train("audio", cfg, out / "run")
    train_s = time.perf_counter() - start
    run = load_audio_run(out / "run")
    start = time.perf_counter()
    waves, labels = sample_audio(run, n=10, sampler="unipc", nfe=NFE, guidance=GUIDANCE, seed=seed)
    rtf = (time.perf_counter() - start) / (10 * run.samples / run.sample_rate)
    for wave, label in zip(waves, labels.tolist(), strict=True):
        save_wav(out / f"digit_{label}.wav", wave, run.sample_rate)
    save_spectrogram_grid(out / "spectrograms.png", waves, run.sample_rate)
    from unnoise.modalities.audio import classifier as audio_classifier

    judge = audio_classifier.digit_classifier(run.sample_rate, run.samples / run.sample_rate)
    with torch.no_grad():
        heard = judge(waves).argmax(1).tolist()
    accuracy = sum(h == y for h, y in zip(heard, labels.tolist(), strict=True)) / len(heard)
    print(f"trained {cfg.steps} steps in {train_s:.0f} s; wrote {out}/digit_0.wav .. digit_9.wav and spectrograms.png")
    print(f"the digit classifier hears {heard} for digits 0..9: {accuracy:.0%} right")
    print(f"real-time factor of generation (unipc, {NFE} NFE, guidance {GUIDANCE:g}): {rtf:.2f}")
    return {"train_seconds": train_s, "accuracy": accuracy, "rtf": rtf}
