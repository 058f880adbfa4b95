"""A diffusers pipeline folder sampled by unnoise: the same numbers as diffusers' own pipelines and
schedulers on the same noise, and closer to the 1000-step result at 10 NFE.

The pipelines are built here (tiny UNet2DModels, 8x8 grey images) and saved with ``save_pretrained``:
nothing is downloaded. References run in float64: the UNet in float64, and the scheduler's
``alphas_cumprod`` / ``sigmas`` replaced by float64 values (diffusers keeps float32 tables, whose
rounding moves the network's timestep by ~1e-5 and its output by more than the tolerance).
"""

import json
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from unnoise.sampling.diffusers_folder import (  # noqa: E402
    betas_from_config,
    load_diffusers_folder,
    sample_diffusers_folder,
    scheduler_grid,
    write_diffusers_samples,
)
from unnoise.sampling.samplers import SAMPLERS  # noqa: E402

f64 = torch.float64


def _unet(**kw):
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """An unconditional eps-prediction DDPMPipeline with diffusers' defaults (linear betas, clip_sample)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ddpm")
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """A class-conditional v-prediction UNet (10 digits + a null class 10 for guidance), trained 150
    steps on scikit-learn's 8x8 digits (~2 s): its denoiser is smooth enough for a solver comparison."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    unet = _unet(num_class_embeds=11)
    scheduler = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, len(x), (64,), generator=g)
        labels = torch.where(torch.rand(64, generator=g) < 0.1, 10, y[i])
        t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(64, 1, 8, 8, generator=g)
        out = unet(scheduler.add_noise(x[i], noise, t), t, class_labels=labels).sample
        loss = (out - scheduler.get_velocity(x[i], noise, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("classes")
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(folder)
    return folder


def _float64_pipeline(cls, folder, model):
    """diffusers' pipeline ``cls`` on the folder, in float64 (the UNet and alphas_cumprod)."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").double()
    scheduler = getattr(diffusers, cls.__name__.replace("Pipeline", "Scheduler")).from_pretrained(folder / "scheduler")
    scheduler.alphas_cumprod = model.schedule.alpha_bar[1:].clone()
    pipe = cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_scheduler(scheduler, unet, model, noise, n, labels=None, guidance=1.0, **step):
    """diffusers' sampling loop (scale_model_input, UNet, step) in float64 from VP noise x_T."""
    scheduler.alphas_cumprod = model.schedule.alpha_bar[1:].clone()
    scheduler.set_timesteps(n)
    if hasattr(scheduler, "sigmas"):
        t = scheduler.timesteps.double()
        scheduler.sigmas = torch.cat([model.schedule.sigma(t + 1), torch.zeros(1, dtype=f64)])
    sample = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(sample, t)
            out = unet(inp, t, class_labels=labels).sample
            if guidance != 1.0:
                null = unet(inp, t, class_labels=torch.full_like(labels, 10)).sample
                out = null + guidance * (out - null)
            sample = scheduler.step(out, t, sample, **step).prev_sample
    return sample


# ---------------------------------------------------------------------------------------------
# reading the folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid"},
        {"trained_betas": np.linspace(1e-3, 0.05, 200).tolist()},
        {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "num_train_timesteps": 500},
    ],
)
def test_betas_are_the_schedulers(config):
    ours = torch.cumprod(1 - betas_from_config(diffusers.DDPMScheduler(**config).config), 0)
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()
    if config.get("rescale_betas_zero_snr"):  # a finite sigma_max, as EulerDiscreteScheduler does it
        assert theirs[-1] == 0
        theirs[-1] = 2.0**-24
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-9)


def test_the_folder_maps_onto_a_schedule_and_a_denoiser(ddpm_folder, class_folder):
    model = load_diffusers_folder(ddpm_folder)
    assert model.shape == (1, 8, 8) and model.num_classes is None and model.clip and model.schedule.T == 1000
    assert model.base.prediction == "eps" and model.base.timestep_offset == 1
    model = load_diffusers_folder(class_folder)
    assert model.num_classes == 11 and not model.clip and model.base.prediction == "v"
    # DDIMScheduler.set_timesteps(10): leading steps 900, 800, ..., 0 (diffusers' indices), then 0
    sigmas = scheduler_grid(10, model.schedule, "leading")
    torch.testing.assert_close(sigmas[:-1], model.schedule.sigma(torch.arange(901, 0, -100, dtype=f64)))


def test_a_folder_of_pickles_is_refused_in_one_line(tmp_path, monkeypatch):
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        tmp_path, safe_serialization=False
    )
    assert list((tmp_path / "unet").glob("*.bin")) and not list((tmp_path / "unet").glob("*.safetensors"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (unpickling) was called"))
    with pytest.raises(ValueError, match="only pickled .bin weights; unnoise reads safetensors only") as e:
        load_diffusers_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_broken_folders_are_named_in_one_line(ddpm_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        load_diffusers_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON"):
        load_diffusers_folder(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", "vqvae": ["x", "y"]}))
    with pytest.raises(ValueError, match="only pixel-space UNet2DModel pipelines"):
        load_diffusers_folder(tmp_path)
    model = load_diffusers_folder(ddpm_folder)
    noise = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown sampler 'plms'; allowed: ddpm, ddim"):
        model.sample(noise, sampler="plms", nfe=10)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        model.sample(noise, sampler="ddim", nfe=0)
    with pytest.raises(ValueError, match="unconditional"):
        sample_diffusers_folder(model, n=1, nfe=2, class_id=3)


# ---------------------------------------------------------------------------------------------
# the same numbers as diffusers
# ---------------------------------------------------------------------------------------------


def test_ddim_equals_diffusers_ddim_pipeline_with_clipping(ddpm_folder):
    """clip_sample: x0 clamped at every evaluation is DDIM with use_clipped_model_output=True."""
    model = load_diffusers_folder(ddpm_folder, dtype=f64)
    pipe = _float64_pipeline(diffusers.DDIMPipeline, ddpm_folder, model)
    for n in (10, 50):
        ref = pipe(
            batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=n, eta=0.0,
            use_clipped_model_output=True, output_type="pt",
        ).images  # fmt: skip
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=f64)
        out = model.sample(noise, sampler="ddim", nfe=n, grid="scheduler")
        assert (out / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-5


def test_ddpm_equals_diffusers_ddpm_pipeline_noise_and_all(ddpm_folder):
    """The ancestral sampler draws its noise from the generator that drew x_T, as DDPMPipeline does."""
    model = load_diffusers_folder(ddpm_folder, dtype=f64)
    pipe = _float64_pipeline(diffusers.DDPMPipeline, ddpm_folder, model)
    ref = pipe(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=20, output_type="pt")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=f64)
    out = model.sample(noise, sampler="ddpm", nfe=20, grid="scheduler", generator=g)
    assert (out / 2 + 0.5).clamp(0, 1).sub(ref.images).abs().max() < 1e-5


def test_uint8_samples_and_files_match_the_float32_pipeline(ddpm_folder, tmp_path):
    pipe = diffusers.DDIMPipeline.from_pretrained(ddpm_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
        use_clipped_model_output=True, output_type="np",
    ).images  # fmt: skip
    images, labels = sample_diffusers_folder(ddpm_folder, sampler="ddim", nfe=10, n=3, seed=1, grid="scheduler")
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8) and labels.tolist() == [-1, -1, -1]
    assert np.abs(images.permute(0, 2, 3, 1).numpy() / 255.0 - ref).max() <= 1 / 255 + 1e-6
    written = write_diffusers_samples(tmp_path / "out.png", images, labels)
    assert [p.name for p in written] == ["out.png", "out.npz"]
    assert np.array_equal(np.load(written[1])["images"], images.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize(
    "scheduler, ours", [("EulerDiscreteScheduler", "euler"), ("DPMSolverMultistepScheduler", "dpmpp_2m")]
)
def test_euler_and_dpmpp_2m_equal_diffusers_schedulers_on_the_unet(class_folder, scheduler, ours):
    """On diffusers' own grid; these steps cast the sample to float32 (the 1e-5 holds at sample scale ~2)."""
    model = load_diffusers_folder(class_folder, dtype=f64)
    unet = model.unet
    labels = torch.arange(4) % 10
    for n in (10, 25):
        sched = getattr(diffusers, scheduler).from_pretrained(class_folder / "scheduler")
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(n), dtype=f64)
        ref = _run_scheduler(sched, unet, model, noise, n, labels)
        sigmas = sched.sigmas
        with torch.no_grad():
            out = SAMPLERS[ours](model.denoiser(labels), noise * math.sqrt(1 + sigmas[0] ** 2), sigmas)
        assert (out - ref).abs().max() < 1e-5


def test_class_conditional_and_guided_ddim_equal_diffusers(class_folder):
    model = load_diffusers_folder(class_folder, dtype=f64)
    labels = torch.tensor([0, 3, 7, 9])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=f64)
    for guidance in (1.0, 2.5):
        sched = diffusers.DDIMScheduler.from_pretrained(class_folder / "scheduler")
        ref = _run_scheduler(sched, model.unet, model, noise, 10, labels, guidance)
        with torch.no_grad():
            out = model.sample(
                noise, sampler="ddim", nfe=10, grid="scheduler", labels=labels, guidance=guidance, null_class=10
            )
        assert (out - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="guidance needs null_class"):
        model.sample(noise, sampler="ddim", nfe=10, labels=labels, guidance=2.0)
    images, got = sample_diffusers_folder(model, sampler="dpmpp_2m", nfe=6, n=3, class_id=7)
    assert got.tolist() == [7, 7, 7] and images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"unknown class 11; allowed: 0..10"):
        sample_diffusers_folder(model, n=1, nfe=2, class_id=11)


def test_unnoise_at_10_nfe_is_closer_to_the_1000_step_result_than_diffusers(class_folder):
    """Reference: diffusers' DDIM (eta 0) in 1000 steps, the PF-ODE's solution to ~1e-3. At 10 NFE,
    unnoise's DPM-Solver++(2M) on its tuned grid against diffusers' DDIM, Euler, DPM-Solver++(2M)
    and UniPC on the folder's leading spacing and on trailing (the usual fix). Measured RMS
    distances (this model, 8 samples): unnoise 0.014; diffusers 0.037 at best (UniPC, leading),
    0.040-0.052 for the other multistep solvers, 0.11-0.12 for DDIM and Euler."""
    model = load_diffusers_folder(class_folder, dtype=f64)
    labels = torch.arange(8) % 10
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=f64)
    ref = _run_scheduler(
        diffusers.DDIMScheduler.from_pretrained(class_folder / "scheduler"), model.unet, model, noise, 1000, labels
    )

    def distance(x):
        return (x - ref).pow(2).mean().sqrt().item()

    theirs = {}
    for spacing in ("leading", "trailing"):
        for name in (
            "DDIMScheduler",
            "EulerDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler",
        ):
            sched = getattr(diffusers, name).from_pretrained(class_folder / "scheduler", timestep_spacing=spacing)
            theirs[f"{name} {spacing}"] = distance(_run_scheduler(sched, model.unet, model, noise, 10, labels))
    with torch.no_grad():
        ours = distance(model.sample(noise, sampler="dpmpp_2m", nfe=10, labels=labels))
    print(f"\nRMS distance to diffusers' 1000-step DDIM at 10 NFE: unnoise dpmpp_2m (tuned grid) {ours:.4f}")
    for name, d in sorted(theirs.items(), key=lambda kv: kv[1]):
        print(f"  diffusers {name}: {d:.4f}")
    assert ours < 0.6 * min(theirs.values()), (ours, theirs)


def test_the_cli_samples_a_folder_as_the_python_api_does(class_folder, tmp_path, capsys):
    from unnoise.cli.main import main

    argv = ["sample", "--diffusers", str(class_folder), "--sampler", "ddim", "--nfe", "5", "--n", "4", "--class", "3"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    saved = np.load(tmp_path / "s.npz")
    images, labels = sample_diffusers_folder(class_folder, sampler="ddim", nfe=5, n=4, class_id=3)
    assert np.array_equal(saved["images"], images.permute(0, 2, 3, 1).numpy()) and (saved["labels"] == 3).all()
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    for bad, says in [
        ([*argv, "--out", str(tmp_path / "s")], "s.png exists; pass --overwrite"),
        ([*argv, "--out", str(tmp_path / "t"), "--template", "a ___"], "--diffusers takes"),
        (["sample", "--diffusers", str(tmp_path), "--out", str(tmp_path / "u")], "model_index.json"),
        ([*argv, "--run", str(tmp_path), "--out", str(tmp_path / "t")], "not allowed with argument"),
    ]:
        try:
            status = main(bad)
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and says in err[0], err
