"""Sample a diffusers pipeline folder (``DDPMPipeline.save_pretrained``) with any unnoise sampler.

A folder holds ``model_index.json``, ``unet/config.json`` with ``unet/diffusion_pytorch_model.safetensors``
(a ``UNet2DModel``, class-conditional when ``num_class_embeds`` is set) and
``scheduler/scheduler_config.json``. The scheduler's config is mapped onto unnoise's objects:

- betas (``beta_schedule`` with ``beta_start``/``beta_end``, or ``trained_betas``; ``rescale_betas_zero_snr``)
  -> a float64 :class:`unnoise.schedules.DiscreteSchedule`;
- ``prediction_type`` / ``variance_type`` -> :func:`unnoise.denoisers.from_diffusers_unet` (eps, v, x0;
  a learned variance's channels are dropped);
- ``timestep_spacing`` and ``steps_offset`` -> the grid ``"scheduler"``: the noise levels of
  ``DDIMScheduler.set_timesteps`` (then 0, as with ``set_alpha_to_one``);
- ``clip_sample`` (``clip_sample_range``) and ``thresholding`` -> the denoiser's x0 clamped to the
  range, or Imagen's dynamic thresholding, at every evaluation. That is diffusers' DDPM step, and its
  DDIM step with ``use_clipped_model_output=True``; DDIM's default recombines the clipped x0 with the
  *unclipped* eps, which is no denoiser (wherever clipping bites it differs, for an untrained UNet
  by the whole pixel range). diffusers' Euler and DPM-Solver schedulers do not clip: ``clip=False``.

Weights are read with safetensors only: a folder holding only pickles (``.bin``) is refused, never
unpickled. The chain starts like diffusers' pipelines: x_T = noise in VP terms, so in sigma-space
``x = noise * sqrt(1 + sigma_max^2)``, one ``torch.Generator`` seeded ``seed`` for the whole batch;
a ``"scheduler"`` grid then gives diffusers' own result. diffusers is imported only to build the UNet.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from unnoise.denoisers import DiscreteDenoiser, clipped, from_diffusers_unet
from unnoise.guidance import conditioned
from unnoise.sampling.core import Callback, Denoiser
from unnoise.sampling.front import sample, steps_for_nfe
from unnoise.sampling.grids import GRID_NAMES, make_grid
from unnoise.sampling.samplers import SAMPLERS
from unnoise.schedules import (
    DiscreteSchedule,
    cosine_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sigmoid_betas,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
SPACINGS = ("linspace", "leading", "trailing")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a diffusers pipeline folder (save_pretrained writes it)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_weights(unet_dir: Path) -> dict[str, Tensor]:
    """The UNet's state dict from its safetensors file; a pickle (``.bin``) is refused, never loaded."""
    from safetensors.torch import load_file

    if (unet_dir / WEIGHTS).is_file():
        return load_file(unet_dir / WEIGHTS)
    if any(unet_dir.glob("*.bin")):
        raise ValueError(
            f"{unet_dir} holds only pickled .bin weights; unnoise reads safetensors only (a pickle can run code): "
            "re-save the pipeline with save_pretrained(..., safe_serialization=True)"
        )
    raise FileNotFoundError(f"{unet_dir / WEIGHTS} is missing: no UNet weights in {unet_dir}")


def betas_from_config(config: dict[str, Any]) -> Tensor:
    """The T betas (float64) a diffusers scheduler config describes, as its ``__init__`` computes them.

    linear: linspace(beta_start, beta_end); scaled_linear: linear in sqrt(beta); squaredcos_cap_v2:
    Nichol and Dhariwal's cosine (Eq. 17, betas capped at 0.999); sigmoid: GeoDiff's. ``trained_betas``
    wins when given. ``rescale_betas_zero_snr``: Lin et al. (2024), Alg. 1, with alpha_bar_T = 2^-24
    (diffusers' choice: a finite sigma_max to start from).
    """
    T = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).flatten()
    else:
        name = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if name == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = scaled_linear_betas(T, start, end)
        elif name == "squaredcos_cap_v2":
            betas = cosine_betas(T)
        elif name == "sigmoid":
            betas = sigmoid_betas(T, start, end)
        else:
            raise ValueError(f"unknown diffusers beta_schedule {name!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
        alpha_bar = torch.cumprod(1 - betas, 0)
        betas[-1] = 1 - 2.0**-24 / alpha_bar[-2]
    return betas


def scheduler_grid(n: int, schedule: DiscreteSchedule, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """The sigmas of ``DDIMScheduler.set_timesteps(n)``: integer steps (diffusers' 0..T-1), then 0.

    linspace: round(linspace(0, T - 1, n)); leading: k (T // n) + steps_offset; trailing:
    round(T - k T / n) - 1, k = 0..n-1, highest first. Step index i is unnoise's t = i + 1.
    """
    T = schedule.T
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"the scheduler grid has 1..T = 1..{T} steps, got {n!r}")
    if spacing == "linspace":
        idx = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
    elif spacing == "leading":
        idx = torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":
        idx = torch.round(T - torch.arange(n, dtype=torch.float64) * (T / n)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return torch.cat([schedule.sigma(idx.clamp(0, T - 1) + 1), torch.zeros(1, dtype=torch.float64)])


def thresholded(denoise: Denoiser, ratio: float = 0.995, max_value: float = 1.0) -> Denoiser:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), as diffusers' ``_threshold_sample``:
    per sample, s = clamp(quantile(|x0|, ratio), 1, max_value) and x0 -> clamp(x0, -s, s) / s."""

    def threshold(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = denoise(x, sigma)
        s = torch.quantile(x0.abs().flatten(1).double(), ratio, dim=1).clamp(1, max_value).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s

    return threshold


@dataclass
class DiffusersModel:
    """A diffusers UNet2DModel folder read into unnoise terms (see the module docstring)."""

    unet: torch.nn.Module
    schedule: DiscreteSchedule
    shape: tuple[int, ...]  # one sample's (C, H, W)
    num_classes: int | None  # the UNet's num_class_embeds (None: unconditional)
    scheduler_config: dict[str, Any]
    clip: bool  # clamp x0 to +-clip_sample_range (or threshold) at every evaluation
    folder: Path
    base: DiscreteDenoiser = field(repr=False)  # from_diffusers_unet's wrapper, its network set per call

    def conditional_denoiser(self) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """``D(x, sigma, labels)`` (labels None for an unconditional UNet), unclipped."""
        dtype = next(self.unet.parameters()).dtype

        def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
            D = copy.copy(self.base)
            D.model = lambda x_t, t: self.unet(x_t.to(dtype), t, class_labels=labels).sample.to(x_t.dtype)
            return D(x, sigma)

        return denoise

    def denoiser(self, labels: Tensor | None = None, guidance: float = 1.0, null_class: int | None = None) -> Denoiser:
        """``D(x, sigma)`` for ``labels`` (N,), classifier-free guided toward them with ``guidance`` (needs
        ``null_class``, the label the UNet was trained with for "no class"), clipped as configured."""
        D = self.conditional_denoiser()
        if (labels is None) != (self.num_classes is None):
            raise ValueError(f"this UNet has num_class_embeds={self.num_classes}: labels must be given iff it is set")
        if guidance != 1.0 and null_class is None:
            raise ValueError("guidance needs null_class: the class id the UNet was trained with for 'no class'")
        if labels is None:
            out: Denoiser = lambda x, s: D(x, s, None)  # noqa: E731
        else:
            out = conditioned(D, labels, torch.tensor(null_class or 0), guidance)
        if not self.clip:
            return out
        c = self.scheduler_config
        if c.get("thresholding"):
            return thresholded(
                out, float(c.get("dynamic_thresholding_ratio", 0.995)), float(c.get("sample_max_value", 1.0))
            )
        r = float(c.get("clip_sample_range", 1.0))
        return clipped(out, -r, r)

    def grid(self, sampler: str, nfe: int, grid: str | None = None) -> Tensor:
        """The noise levels a sampler visits for ``nfe``: ``grid="scheduler"`` is the folder's own
        spacing (:func:`scheduler_grid`); a name of :data:`GRID_NAMES` (None: the sampler's default)."""
        n = steps_for_nfe(sampler, nfe)
        if grid == "scheduler":
            c = self.scheduler_config
            return scheduler_grid(n, self.schedule, c.get("timestep_spacing", "leading"), c.get("steps_offset", 0))
        s, dim = self.schedule, math.prod(self.shape)
        return make_grid(grid or "tuned", n, s.sigma_min, s.sigma_max, schedule=s, sampler=sampler, dim=dim)

    def labels(self, n: int, class_id: int | None) -> Tensor | None:
        """``class_id`` for all n, or the classes in turn (class-conditional UNets); None if unconditional."""
        k = self.num_classes
        if k is None:
            if class_id is not None:
                raise ValueError("this UNet is unconditional (no num_class_embeds): it takes no class")
            return None
        if class_id is None:
            return torch.arange(n) % k
        if not isinstance(class_id, int) or not 0 <= class_id < k:
            raise ValueError(f"unknown class {class_id!r}; allowed: 0..{k - 1}")
        return torch.full((n,), class_id)

    def sample(
        self,
        noise: Tensor,
        *,
        sampler: str,
        nfe: int,
        labels: Tensor | None = None,
        guidance: float = 1.0,
        null_class: int | None = None,
        grid: str | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        **options: Any,
    ) -> Tensor:
        """Samples in model space (unclamped) from standard normal ``noise`` (N, C, H, W), the VP x_T."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if grid not in (None, "scheduler", *GRID_NAMES):
            raise ValueError(f"unknown grid {grid!r}; allowed: scheduler, {', '.join(GRID_NAMES)}")
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        if tuple(noise.shape[1:]) != self.shape:
            raise ValueError(f"noise must have shape (N, {', '.join(map(str, self.shape))}), got {tuple(noise.shape)}")
        D = self.denoiser(labels, guidance, null_class)
        if grid == "scheduler" and sampler == "rk45":
            raise ValueError("rk45 chooses its own steps: use a named grid, not 'scheduler'")
        sigmas = self.grid(sampler, nfe, grid) if sampler != "rk45" else torch.tensor([self.schedule.sigma_max, 0])
        x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
        if grid == "scheduler":
            return SAMPLERS[sampler](D, x, sigmas, generator=generator, callback=callback, **options)
        s = self.schedule
        return sample(
            D, x, sampler=sampler, nfe=nfe, sigma_max=s.sigma_max, sigma_min=s.sigma_min, grid=grid,
            generator=generator, callback=callback, schedule=s, **options,
        )  # fmt: skip


def load_diffusers_folder(
    folder: str | Path, *, clip: bool | None = None, dtype: torch.dtype = torch.float32
) -> DiffusersModel:
    """Read a ``DDPMPipeline`` / ``DiffusionPipeline`` folder's UNet2DModel and scheduler config.

    ``clip`` None follows the config (``clip_sample`` or ``thresholding``); True / False forces it.
    The UNet runs on the CPU in ``dtype`` (float64 to compare samplers without float32 round-off).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no diffusers pipeline folder at {folder}")
    index = _read_json(folder / "model_index.json")
    latent = sorted(k for k in ("vae", "vqvae", "text_encoder", "transformer") if index.get(k))
    if latent:
        what = f"{folder} is a {index.get('_class_name', 'pipeline')} with {', '.join(latent)}"
        raise ValueError(f"{what}: only pixel-space UNet2DModel pipelines are read")
    unet_config = _read_json(folder / "unet" / "config.json")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{folder / 'unet'} holds a {unet_config['_class_name']}; allowed: UNet2DModel")
    config = _read_json(folder / "scheduler" / "scheduler_config.json")
    if config.get("timestep_spacing", "leading") not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {config['timestep_spacing']!r}; allowed: {', '.join(SPACINGS)}")
    # diffusers itself need not be imported for this: from_diffusers_unet reads .config and .betas only
    scheduler = type(str(config.get("_class_name", "Scheduler")), (SimpleNamespace,), {})
    base = from_diffusers_unet(None, scheduler(config=config, betas=betas_from_config(config)))
    weights = _read_weights(folder / "unet")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("reading a diffusers folder needs diffusers: pip install 'unnoise[diffusers]'") from None

    unet = UNet2DModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{folder / 'unet' / WEIGHTS} does not fit its config.json: {str(e).splitlines()[0]}"
        ) from None
    unet = unet if dtype == torch.float32 else unet.to(dtype=dtype)  # .to() alone makes diffusers warn
    size = unet_config.get("sample_size", 32)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    clip = bool(config.get("clip_sample") or config.get("thresholding")) if clip is None else clip
    return DiffusersModel(
        unet.eval(), base.schedule, (int(unet_config.get("in_channels", 3)), *hw),
        unet_config.get("num_class_embeds"), config, clip, folder, base,
    )  # fmt: skip


@torch.no_grad()
def sample_diffusers_folder(
    folder: str | Path | DiffusersModel,
    *,
    sampler: str = "dpmpp_2m",
    nfe: int = 20,
    n: int = 16,
    seed: int = 0,
    class_id: int | None = None,
    guidance: float = 1.0,
    null_class: int | None = None,
    grid: str | None = None,
    callback: Callback | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """``n`` images (uint8 (N, C, H, W)) and their labels (-1: unconditional) from a diffusers folder.

    The noise is diffusers' pipelines' ``randn((n, C, H, W), generator=Generator().manual_seed(seed))``;
    class-conditional UNets without ``class_id`` draw the classes in turn. ``options`` go to the
    sampler (e.g. ``eta``).
    """
    model = folder if isinstance(folder, DiffusersModel) else load_diffusers_folder(folder)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    labels = model.labels(n, class_id)
    generator = torch.Generator().manual_seed(int(seed))
    dtype = next(model.unet.parameters()).dtype
    noise = torch.randn((n, *model.shape), generator=generator, dtype=dtype)
    out = model.sample(
        noise, sampler=sampler, nfe=nfe, labels=labels, guidance=guidance, null_class=null_class, grid=grid,
        generator=generator, callback=callback, **options,
    )  # fmt: skip
    images = ((out.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images, labels if labels is not None else torch.full((n,), -1)


def write_diffusers_samples(out: str | Path, images: Tensor, labels: Tensor | None = None) -> list[Path]:
    """Write ``OUT.png`` (a grid, images enlarged to about 64 pixels) and ``OUT.npz`` (images, labels)."""
    from unnoise.modalities.image.io import save_grid, save_npz

    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".png", ".npz") else out
    scale = max(1, 64 // images.shape[-1])
    return [
        save_grid(out.with_name(out.name + ".png"), images, scale=scale),
        save_npz(out.with_name(out.name + ".npz"), images, labels),
    ]
