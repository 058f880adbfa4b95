"""Sampling jobs for the web page: one run's modality sampling in a background thread, watched live.

A job samples exactly as ``unnoise sample`` does (``modality.sample(run, ...)`` then
``modality.write(run, samples, out, ...)``), on a copy of the run whose :meth:`Run.denoiser` is
wrapped: every denoiser evaluation ``D(x, sigma) -> x0_hat`` counts towards the progress bar
(evaluations / NFE), and every few the estimate ``x0_hat`` becomes a PNG frame of the denoising
trajectory (images: a grid; waveforms: traces; 2-D points: a scatter; others: no frame). A
modality's own error (``ValueError``) becomes the job's one-line message; nothing is ever a traceback.
"""

from __future__ import annotations

import copy
import io
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("unnoise.web")

MAX_FRAMES = 24  # frames kept per job: a strip of the trajectory, not every step
FRAME_SECONDS = 0.1  # at most one frame per this many seconds (the last step always gives one)


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_frame(x0: Tensor) -> bytes:
    """Up to 16 images (B, C, H, W) in [-1, 1] as one grid, each enlarged to about 64 pixels."""
    from PIL import Image

    x = x0[:16].detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    cols = min(n, 4)
    rows = -(-n // cols)
    grid = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1, dtype=torch.uint8)
    for i, image in enumerate(x):
        top, left = 1 + (i // cols) * (h + 1), 1 + (i % cols) * (w + 1)
        grid[:, top : top + h, left : left + w] = image
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, 64 // max(h, w))
    return _png(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST))


def _wave_frame(x0: Tensor, width: int = 480, height: int = 60) -> bytes:
    """The first 4 waveforms (B, 1, L) in [-1, 1] as traces, one band each."""
    from PIL import Image, ImageDraw

    waves = x0[:4, 0].detach().float().clamp(-1, 1).cpu()
    picture = Image.new("RGB", (width, height * len(waves)), "white")
    draw = ImageDraw.Draw(picture)
    for k, wave in enumerate(waves):
        idx = torch.linspace(0, len(wave) - 1, width).long()
        ys = (height * (k + 0.5) - wave[idx] * height * 0.45).tolist()
        draw.line(list(zip(range(width), ys, strict=True)), fill=(31, 119, 180))
    return _png(picture)


def _points_frame(x0: Tensor, size: int = 256) -> bytes:
    """2-D points (B, 2) as a scatter on a fixed [-2, 2]^2 square (the toy mixtures' scale)."""
    from PIL import Image, ImageDraw

    pts = ((x0.detach().float().cpu().clamp(-2, 2) + 2) / 4 * (size - 1)).tolist()
    picture = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(picture)
    for px, py in pts:
        draw.ellipse((px - 1.5, size - 1 - py - 1.5, px + 1.5, size - 1 - py + 1.5), fill=(31, 119, 180))
    return _png(picture)


def frame(x0: Tensor) -> bytes | None:
    """A PNG picture of a batch of denoised estimates, by its shape; None where none fits (text)."""
    if x0.ndim == 4 and x0.shape[1] in (1, 3):
        return _image_frame(x0)
    if x0.ndim == 3 and x0.shape[1] == 1:
        return _wave_frame(x0)
    if x0.ndim == 2 and x0.shape[1] == 2:
        return _points_frame(x0)
    return None


@dataclass
class Job:
    """One sampling request: its options, progress, trajectory frames and, when done, its files."""

    options: dict[str, Any]
    folder: Path  # the job's own output folder, inside the server's
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "running"  # running, done, error
    evaluations: int = 0
    sigma: float | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)  # names inside ``folder``
    frames: list[bytes] = field(default_factory=list)
    frame_version: int = 0  # frames made so far (the newest is frames[-1])
    _last_frame: float = 0.0

    @property
    def progress(self) -> float:
        if self.state != "running":
            return 1.0
        return min(0.99, self.evaluations / max(1, int(self.options["nfe"])))

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "progress": round(self.progress, 4), "evaluations": self.evaluations,
            "nfe": self.options["nfe"], "sigma": self.sigma, "error": self.error, "frames": len(self.frames),
            "frame_version": self.frame_version,
            "files": [{"name": name, "url": f"/files/{self.id}/{name}"} for name in self.files],
        }  # fmt: skip

    def observe(self, x0: Tensor, sigma: Tensor) -> None:
        """Called after each denoiser evaluation: count it, and keep a frame now and then."""
        self.evaluations += 1
        s = torch.as_tensor(sigma).detach().float()
        self.sigma = float(s.max()) if s.numel() else None
        last = self.evaluations >= int(self.options["nfe"])
        if last or time.monotonic() - self._last_frame >= FRAME_SECONDS:
            picture = frame(x0)
            if picture is not None:  # once the strip is full, its last frame is always the newest
                if len(self.frames) >= MAX_FRAMES:
                    self.frames.pop()
                self.frames.append(picture)
                self.frame_version += 1
                self._last_frame = time.monotonic()


def watched(run: Any, job: Job) -> Any:
    """A shallow copy of ``run`` whose denoisers report each evaluation to ``job``."""
    original = run.denoiser

    def denoiser(*args: Any, **kwargs: Any):
        D = original(*args, **kwargs)

        def observed(x: Tensor, sigma: Tensor) -> Tensor:
            x0 = D(x, sigma)
            job.observe(x0, sigma)
            return x0

        return observed

    watched_run = copy.copy(run)
    watched_run.denoiser = denoiser
    return watched_run


def run_job(run: Any, job: Job, given: dict[str, Any]) -> None:
    """Sample and write as ``unnoise sample`` does; ``given`` are the modality's own options."""
    try:
        with torch.no_grad():
            samples = run.modality.sample(watched(run, job), **job.options)
            written = run.modality.write(run, samples, job.folder / "sample", **given)
        job.files = [Path(p).name for p in written if Path(p).parent.resolve() == job.folder.resolve()]
        if isinstance(samples, list):  # sentences: also offered as one text file
            job.files = job.files or [_write_text(job.folder / "sample.txt", samples)]
        job.state = "done"
    except (ValueError, FileNotFoundError, ImportError) as e:
        job.error, job.state = (str(e).strip().splitlines() or [type(e).__name__])[0], "error"
    except Exception as e:  # a bug: the page gets one line, the server's log the traceback
        log.exception("sampling job %s failed", job.id)
        job.error, job.state = (
            f"sampling failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "error",
        )


def _write_text(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return path.name


class Runner:
    """One job at a time (sampling takes every core): start, look up, and refuse a second while busy."""

    def __init__(self, run: Any, out_dir: Path) -> None:
        self.run, self.out_dir = run, out_dir
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def busy(self) -> bool:
        return any(job.state == "running" for job in self.jobs.values())

    def start(self, options: dict[str, Any], given: dict[str, Any]) -> Job:
        with self.lock:
            if self.busy():
                raise ValueError("a sample is being drawn: wait until it is done")
            job = Job(options, self.out_dir)
            job.folder = self.out_dir / job.id
            job.folder.mkdir(parents=True)
            self.jobs[job.id] = job
        threading.Thread(target=run_job, args=(self.run, job, given), daemon=True, name=f"job-{job.id}").start()
        return job
