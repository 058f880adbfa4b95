"""The web page's ASGI app (Starlette): choose a sampler and its options, watch, download.

Routes: ``GET /`` the page (one HTML file, no external script or style: it works offline);
``GET /api/info`` what the run offers (modality, samplers, options, classes); ``POST /api/sample``
(JSON) starts a job, or answers 400 with ``{"error": one line}``; ``GET /api/jobs/{id}`` its
progress and files; ``GET /api/jobs/{id}/frames/{k}.png`` a trajectory frame (``latest.png``: the
newest); ``GET /files/{id}/{name}`` a file the job wrote. Nothing else is served: a name that is
not one of a job's files (``..``, a slash, another folder) is a 404, so no path outside the
server's output folder can be read. The server binds 127.0.0.1 unless told otherwise.
Optional dependency: ``pip install 'unnoise[web]'`` (starlette, uvicorn).
"""

from __future__ import annotations

import inspect
import math
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
except ImportError:  # the CLI turns this into one line
    raise ImportError("the web page needs starlette and uvicorn: pip install 'unnoise[web]'") from None

from unnoise.modalities.run import load_run
from unnoise.sampling.grids import GRID_NAMES
from unnoise.sampling.samplers import SAMPLERS
from unnoise.web.jobs import Runner

MAX_NFE = 1000
MAX_N = 64
MEDIA = {".png": "image/png", ".wav": "audio/wav", ".txt": "text/plain; charset=utf-8", ".npz": "application/zip"}
# How each option a modality may take is read from the form: a number, a whole number, a choice, text.
FLOATS = {"guidance": (0.0, math.inf), "eta": (0.0, 1.0), "control_scale": (0.0, math.inf)}


def _whole(form: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = form.get(name, default)
    text = str(value).strip() if value is not None else ""
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {text!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {number}")
    return number


def _number(name: str, text: str) -> float:
    low, high = FLOATS[name]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {text}")
    return value


def class_names(run: Any) -> list[str]:
    """The run's class names, if it is class-conditional (empty otherwise)."""
    names = run.extra.get("class_names") or []
    return [str(name) for name in names] if run.cfg.conditional and names else []


def parse_form(run: Any, form: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling options, the modality's own options) from the page's form; one-line ValueError otherwise.

    The same checks as ``unnoise sample``: a known sampler, NFE and n in range, an integer seed,
    and only the options the run's modality takes (``modality.sample_options``).
    """
    if not isinstance(form, dict):
        raise ValueError("send the form as a JSON object")
    sampler = str(form.get("sampler") or run.modality.default_sampler)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    options = {
        "sampler": sampler,
        "nfe": _whole(form, "nfe", 1, MAX_NFE, 20),
        "n": _whole(form, "n", 1, MAX_N, 16),
        "seed": _whole(form, "seed", 0, 2**63 - 1, 0),
    }
    accepted = tuple(run.modality.sample_options)
    given: dict[str, Any] = {}
    for name, value in form.items():
        if name in options or value is None or str(value).strip() == "":
            continue
        if name not in accepted or name == "trajectory":
            takes = ", ".join(a for a in accepted if a != "trajectory") or "no options"
            raise ValueError(f"{run.name} runs take {takes}; not {name}")
        text = str(value).strip()
        if name in FLOATS:
            given[name] = _number(name, text)
        elif name == "class_id":
            names = class_names(run)
            if not names:
                raise ValueError("this run is unconditional: it takes no class")
            given[name] = _whole(form, name, 0, len(names) - 1)
        elif name == "grid":
            if text not in GRID_NAMES:
                raise ValueError(f"unknown grid {text!r}; allowed: {', '.join(GRID_NAMES)}")
            given[name] = text
        elif name == "control":
            given[name] = [part.strip() for part in text.split(",") if part.strip()]
        else:
            given[name] = text
    if "eta" in given and "eta" not in inspect.signature(SAMPLERS[sampler]).parameters:
        with_eta = [k for k, fn in SAMPLERS.items() if "eta" in inspect.signature(fn).parameters]
        raise ValueError(f"eta applies to {', '.join(with_eta)}; not to {sampler}")
    if given.get("guidance", 1.0) == 1.0:
        given.pop("guidance", None)
    return options | given, given


def _info(run: Any) -> dict[str, Any]:
    options = [name for name in run.modality.sample_options if name != "trajectory"]
    if "class_id" in options and not class_names(run):
        options = [name for name in options if name not in ("class_id", "guidance")]
    return {
        "run": str(run.path.name if run.path is not None else ""),
        "modality": run.name,
        "samplers": list(SAMPLERS),
        "default_sampler": run.modality.default_sampler,
        "options": options,
        "classes": class_names(run),
        "grids": list(GRID_NAMES),
        "max_nfe": MAX_NFE,
        "max_n": MAX_N,
    }


def create_app(run_dir: str | Path, out_dir: str | Path | None = None) -> Starlette:
    """The app for the run in ``run_dir``; samples are written under ``out_dir`` (default: a new
    temporary folder), one subfolder per job. Loads the run now: a bad folder fails here, in one line."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="unnoise-web-"))
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(run, out.resolve())
    page = resources.files("unnoise.web").joinpath("page.html").read_text(encoding="utf-8")

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def info(request: Request) -> Response:
        return JSONResponse(_info(run))

    async def start(request: Request) -> Response:
        try:
            form = await request.json()
        except ValueError:
            return error("send the form as a JSON object")
        try:
            options, given = parse_form(run, form)
            job = runner.start(options, given)
        except ValueError as e:
            return error(str(e).splitlines()[0])
        return JSONResponse(job.status())

    def job_of(request: Request):
        return runner.jobs.get(request.path_params["job"])

    async def status(request: Request) -> Response:
        job = job_of(request)
        return JSONResponse(job.status()) if job is not None else error("no such job", 404)

    async def frame(request: Request) -> Response:
        job, k = job_of(request), request.path_params["k"]
        if job is None or not job.frames:
            return error("no such frame", 404)
        if k == "latest":
            return Response(job.frames[-1], media_type="image/png", headers={"Cache-Control": "no-store"})
        if not k.isdigit() or int(k) >= len(job.frames):
            return error("no such frame", 404)
        return Response(job.frames[int(k)], media_type="image/png", headers={"Cache-Control": "no-store"})

    async def download(request: Request) -> Response:
        # Only a file the job itself wrote, by its bare name: never a path that the request makes up.
        job, name = job_of(request), request.path_params["name"]
        if job is None or name not in job.files:
            return error("no such file", 404)
        path = (job.folder / name).resolve()
        if path.parent != job.folder.resolve() or not path.is_file():
            return error("no such file", 404)
        return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"), filename=name)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/sample", start, methods=["POST"]),
        Route("/api/jobs/{job}", status),
        Route("/api/jobs/{job}/frames/{k}.png", frame),
        Route("/files/{job}/{name}", download),
    ]
    app = Starlette(routes=routes)
    app.state.runner = runner
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, out_dir: str | Path | None = None) -> None:
    """Serve the page for ``run_dir`` at http://host:port until interrupted (127.0.0.1: this machine only)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("the web page needs starlette and uvicorn: pip install 'unnoise[web]'") from None
    app = create_app(run_dir, out_dir)
    print(f"unnoise serve: http://{host}:{port}/ (the {app.state.runner.run.name} run in {run_dir}; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
