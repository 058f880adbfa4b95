"""Bad input through the CLI, as a new user would give it: one line, exit 2, nothing lost.

A corpus of bad or unusual inputs (paths, config files, damaged or tampered run folders, absurd
sizes, locks); each case asserts exit status 2, exactly one line on stderr, no traceback, and that
every file present before the command is unchanged after it. The tests below the corpus cover
what is not a refusal: falling back past a damaged checkpoint, signals, stale locks, NaN weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unnoise.cli.main import main
from unnoise.training import checkpoint, integrity
from unnoise.training.lock import RunLock
from unnoise.training.signals import Interrupted, StopSignals

TOY = ["train", "toy", "--model", "tiny", "--steps", "6", "--save-every", "3"]
IMAGE = ["train", "image", "--data", "digits", "--model", "tiny", "--steps", "2", "--batch-size", "8"]


def _cli(argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        return int(e.code)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A toy run (steps 3 and 6 kept) and a tiny image run, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    assert _cli([*TOY, "--out", root / "toy"]) == 0
    assert _cli([*IMAGE, "--out", root / "image"]) == 0
    return root


# ---- helpers that damage a run in the ways the corpus needs -------------------------------------


def _steps(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def _reseal(step: Path) -> None:
    """Rewrite a step's manifest after editing it: what the loader's own checks must then catch."""
    integrity.write_manifest(step)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x10
    path.write_bytes(bytes(data))


def _in_every_step(run: Path, damage, reseal: bool = False) -> None:
    for step in _steps(run):
        damage(step)
        if reseal:
            _reseal(step)


def _nan_weights(step: Path) -> None:
    for name in ("model", "ema"):
        weights = load_file(step / f"{name}.safetensors")
        key = next(iter(weights))
        weights[key] = weights[key].clone().fill_(float("nan"))
        save_file(weights, step / f"{name}.safetensors")


def _tamper_state(step: Path) -> None:
    _edit_json(step / "state.json", lambda s: s | {"step": "ten"})


def _tamper_rng(step: Path) -> None:
    _edit_json(step / "rng.json", lambda s: s | {"python": [3, [1, 2], None]})


def _optimizer_wrong_shape(step: Path) -> None:
    tensors = load_file(step / "optimizer.safetensors")
    key = next(k for k, v in tensors.items() if v.dim() > 0)
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    save_file(tensors, step / "optimizer.safetensors")


def _pickle_for_ema(step: Path) -> None:
    torch.save({"w": torch.zeros(2)}, step / "ema.safetensors")


def _partial_steps_only(run: Path) -> None:
    (run / "checkpoints/latest").unlink()
    for step in _steps(run):
        (step / "manifest.json").unlink()
        (step / "ema.safetensors").unlink()


def _live_lock(run: Path, host: str | None = None) -> None:
    import socket

    holder = {"pid": os.getppid() if host is None else 12345, "host": host or socket.gethostname(), "started": "x"}
    (run / ".lock").write_text(json.dumps(holder))


# ---- the corpus ---------------------------------------------------------------------------------
# (name, setup(ws) -> argv, expected text in the one line). ws holds copies of the module's runs
# ("toy", "image"), a file "file.txt", a non-run folder "other/" and a config folder "cfg/".


def _config(ws: Path, name: str, text: str | bytes) -> Path:
    path = ws / "cfg" / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CORPUS = [
    # train: where the run goes
    ("train --out is a file", lambda ws: [*TOY, "--out", ws / "file.txt"], "is a file"),
    ("train --out under a file", lambda ws: [*TOY, "--out", ws / "file.txt/run"], "is a file, not a folder"),
    ("train --out unwritable", lambda ws: [*TOY, "--out", "/proc/unnoise-run"], "cannot write in /proc"),
    ("train over a run", lambda ws: [*TOY, "--out", ws / "toy"], "holds a run already"),
    ("train --resume and --overwrite", lambda ws: [*TOY, "--out", ws / "toy", "--resume", "--overwrite"], "give one"),
    ("train --resume a new folder", lambda ws: [*TOY, "--out", ws / "new", "--resume"], "nothing to resume"),
    ("train into another folder", lambda ws: [*TOY, "--out", ws / "other"], "not an unnoise run"),
    ("train --overwrite another folder", lambda ws: [*TOY, "--out", ws / "other", "--overwrite"], "not an unnoise"),
    ("train a locked run", lambda ws: (_live_lock(ws / "toy"), [*TOY, "--out", ws / "toy", "--resume"])[1], "in use"),
    (
        "train a run locked on another host",
        lambda ws: (_live_lock(ws / "toy", "elsewhere"), [*TOY, "--out", ws / "toy", "--resume"])[1],
        "on elsewhere",
    ),
    # train: config files
    (
        "--config a list",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", "[1]")],
        "must hold an object",
    ),
    (
        "--config wrong type",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", '{"lr": "fast"}')],
        "lr must be a finite number",
    ),
    (
        "--config extra not an object",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", '{"extra": 3}')],
        "extra",
    ),
    (
        "--config unknown key",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", '{"learning_rate": 1}')],
        "unknown settings learning_rate",
    ),
    (
        "--config bad JSON",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", "{lr: 1")],
        "not valid JSON",
    ),
    (
        "--config bad TOML",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.toml", "lr = = 1")],
        "not valid TOML",
    ),
    (
        "--config not text",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", b"\xff\xfe\x00")],
        "not a text file",
    ),
    ("--config missing", lambda ws: [*TOY, "--out", ws / "n", "--config", ws / "none.json"], "no config file"),
    (
        "--config a NaN learning rate",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", '{"lr": NaN}')],
        "lr must be a finite number",
    ),
    (
        "--config a bool for an int",
        lambda ws: [*TOY, "--out", ws / "n", "--config", _config(ws, "a.json", '{"keep": true}')],
        "keep must be an integer",
    ),
    # train: flags
    ("--lr negative", lambda ws: [*TOY, "--out", ws / "n", "--lr", "-1"], "lr and grad_clip must be finite"),
    ("--lr nan", lambda ws: [*TOY, "--out", ws / "n", "--lr", "nan"], "lr must be a finite number"),
    ("--steps 0", lambda ws: [*TOY, "--out", ws / "n", "--steps", "0"], "expected a positive integer"),
    ("--batch-size -1", lambda ws: [*TOY, "--out", ws / "n", "--batch-size", "-1"], "expected a positive integer"),
    ("unknown modality", lambda ws: ["train", "video", "--out", ws / "n"], "invalid choice"),
    ("unknown --objective", lambda ws: [*TOY, "--out", ws / "n", "--objective", "ve"], "unknown objective 've'"),
    (
        "--loss under edm",
        lambda ws: [*TOY, "--out", ws / "n", "--objective", "edm", "--loss", "vlb"],
        "apply to objective 'ddpm'",
    ),
    ("unknown --schedule", lambda ws: [*TOY, "--out", ws / "n", "--schedule", "zigzag"], "unknown schedule"),
    ("unknown --model", lambda ws: [*TOY[:3], "huge", *TOY[4:], "--out", ws / "n"], "huge"),
    ("unknown toy --data", lambda ws: [*TOY, "--out", ws / "n", "--data", "spiral"], "spiral"),
    ("--arch for toy", lambda ws: [*TOY, "--out", ws / "n", "--arch", "unet"], "--arch chooses the audio network"),
    # train --resume: a damaged or tampered run
    (
        "resume: every step bit-flipped",
        lambda ws: (
            _in_every_step(ws / "toy", lambda s: _flip_bit(s / "model.safetensors")),
            [*TOY, "--out", ws / "toy", "--resume"],
        )[1],
        "no intact checkpoint",
    ),
    (
        "resume: state.json step tampered",
        lambda ws: (_in_every_step(ws / "toy", _tamper_state, True), [*TOY, "--out", ws / "toy", "--resume"])[1],
        "state.json must hold an object with step",
    ),
    (
        "resume: rng tampered",
        lambda ws: (_in_every_step(ws / "toy", _tamper_rng, True), [*TOY, "--out", ws / "toy", "--resume"])[1],
        "the python RNG state is not valid",
    ),
    (
        "resume: optimizer of the wrong shape",
        lambda ws: (
            _in_every_step(ws / "toy", _optimizer_wrong_shape, True),
            [*TOY, "--out", ws / "toy", "--resume"],
        )[1],
        "optimizer.json:",
    ),
    (
        "resume: NaN weights",
        lambda ws: (_in_every_step(ws / "toy", _nan_weights, True), [*TOY, "--out", ws / "toy", "--resume"])[1],
        "non-finite",
    ),
    (
        "resume: only partial step folders",
        lambda ws: (_partial_steps_only(ws / "toy"), [*TOY, "--out", ws / "toy", "--resume"])[1],
        "ema.safetensors is missing",
    ),
    # sample: where the samples go
    ("sample --out an existing PNG", lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "old"], "exists"),
    (
        "sample --out an existing NPZ",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "old.npz"],
        "old.png exists; pass --overwrite",
    ),
    (
        "sample --out a folder",
        lambda ws: ((ws / "grid.png").mkdir(), ["sample", "--run", ws / "toy", "--out", ws / "grid.png"])[1],
        "is a folder",
    ),
    (
        "sample --out under a file",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "file.txt/s"],
        "is a file, not a folder",
    ),
    ("sample --out unwritable", lambda ws: ["sample", "--run", ws / "toy", "--out", "/proc/s"], "cannot write"),
    (
        "sample --trajectory existing",
        lambda ws: ["sample", "--run", ws / "image", "--out", ws / "s", "--trajectory", ws / "file.txt"],
        "file.txt exists",
    ),
    (
        "sample --trajectory under a file",
        lambda ws: ["sample", "--run", ws / "image", "--out", ws / "s", "--trajectory", ws / "file.txt/t.png"],
        "is a file, not a folder",
    ),
    (
        "sample --trajectory is the grid",
        lambda ws: ["sample", "--run", ws / "image", "--out", ws / "s", "--trajectory", ws / "s.png"],
        "is one of the sample files",
    ),
    # sample: sizes and options
    (
        "sample --nfe 1e9",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--nfe", "1000000000"],
        "at most",
    ),
    (
        "sample --n not a number",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--n", "10**12"],
        "integer",
    ),
    (
        "sample --n absurd",
        lambda ws: ["sample", "--run", ws / "image", "--out", ws / "s", "--n", "100000000000"],
        "GiB",
    ),
    ("sample --n 0", lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--n", "0"], "positive integer"),
    (
        "sample unknown sampler",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--sampler", "magic"],
        "unknown sampler 'magic'",
    ),
    (
        "sample --eta for heun",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--sampler", "heun", "--eta", "1"],
        "--eta applies",
    ),
    (
        "sample --class for toy",
        lambda ws: ["sample", "--run", ws / "toy", "--out", ws / "s", "--class", "1"],
        "toy runs take",
    ),
    (
        "sample text from a toy run",
        lambda ws: ["sample", "text", "--run", ws / "toy", "--out", ws / "s"],
        "is a toy run",
    ),
    # sample: the run folder
    ("sample --run missing", lambda ws: ["sample", "--run", ws / "nope", "--out", ws / "s"], "no run folder"),
    ("sample --run a file", lambda ws: ["sample", "--run", ws / "file.txt", "--out", ws / "s"], "no run folder"),
    (
        "sample --run not a run",
        lambda ws: ["sample", "--run", ws / "other", "--out", ws / "s"],
        "config.json is missing",
    ),
    (
        "sample: config.json a list",
        lambda ws: ((ws / "toy/config.json").write_text("[]"), ["sample", "--run", ws / "toy", "--out", ws / "s"])[1],
        "is not a run's config",
    ),
    (
        "sample: config.json bad JSON",
        lambda ws: ((ws / "toy/config.json").write_text("{"), ["sample", "--run", ws / "toy", "--out", ws / "s"])[1],
        "not valid JSON",
    ),
    (
        "sample: config.json unknown training key",
        lambda ws: (
            _edit_json(ws / "toy/config.json", lambda c: c | {"train": c["train"] | {"speed": 1}}),
            ["sample", "--run", ws / "toy", "--out", ws / "s"],
        )[1],
        "unknown settings speed",
    ),
    (
        "sample: config.json unknown U-Net key",
        lambda ws: (
            _edit_json(ws / "image/config.json", lambda c: c | {"net": c["net"] | {"depth": 3}}),
            ["sample", "--run", ws / "image", "--out", ws / "s"],
        )[1],
        "unknown settings depth",
    ),
    (
        "sample: config.json wrong-typed U-Net field",
        lambda ws: (
            _edit_json(ws / "image/config.json", lambda c: c | {"net": c["net"] | {"base_channels": "wide"}}),
            ["sample", "--run", ws / "image", "--out", ws / "s"],
        )[1],
        "base_channels must be an integer",
    ),
    (
        "sample: toy network settings damaged",
        lambda ws: (
            _edit_json(ws / "toy/config.json", lambda c: c | {"train": c["train"] | {"extra": {"modality": "toy"}}}),
            ["sample", "--run", ws / "toy", "--out", ws / "s"],
        )[1],
        "network's settings",
    ),
    (
        "sample: ema bit-flipped everywhere",
        lambda ws: (
            _in_every_step(ws / "toy", lambda s: _flip_bit(s / "ema.safetensors")),
            ["sample", "--run", ws / "toy", "--out", ws / "s"],
        )[1],
        "does not match the SHA-256",
    ),
    (
        "sample: NaN weights",
        lambda ws: (_in_every_step(ws / "toy", _nan_weights, True), ["sample", "--run", ws / "toy", "--out", ws / "s"])[
            1
        ],
        "non-finite",
    ),
    (
        "sample: a pickle as ema",
        lambda ws: (
            _in_every_step(ws / "toy", _pickle_for_ema, True),
            ["sample", "--run", ws / "toy", "--out", ws / "s"],
        )[1],
        "never unpickles",
    ),
    (
        "sample: only partial steps",
        lambda ws: (_partial_steps_only(ws / "toy"), ["sample", "--run", ws / "toy", "--out", ws / "s"])[1],
        "ema.safetensors is missing",
    ),
    # eval and demo
    ("eval --run missing", lambda ws: ["eval", "--run", ws / "nope"], "no run folder"),
    ("eval --fid for toy", lambda ws: ["eval", "--run", ws / "toy", "--fid", "10"], "toy runs take"),
    ("eval --nfe 0", lambda ws: ["eval", "--run", ws / "toy", "--nfe", "0"], "positive integer"),
    ("demo --out a file", lambda ws: ["demo", "toy", "--out", ws / "file.txt"], "is a file"),
    ("demo --out not empty", lambda ws: ["demo", "toy", "--out", ws / "other"], "pass --overwrite"),
    ("demo --out other files", lambda ws: ["demo", "toy", "--out", ws / "other", "--overwrite"], "no earlier demo"),
    ("demo --out under a file", lambda ws: ["demo", "toy", "--out", ws / "file.txt/d"], "is a file, not a folder"),
    ("demo unknown kind", lambda ws: ["demo", "video"], "invalid choice"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def ws(runs, tmp_path) -> Path:
    for name in ("toy", "image"):
        shutil.copytree(runs / name, tmp_path / name)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("someone else's\n")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "old.png").write_bytes(b"an earlier result")
    return tmp_path


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 60 and len({name for name, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, setup, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_gives_one_line_exit_2_and_loses_nothing(ws, capsys, name, setup, expected):
    argv = setup(ws)
    before = _snapshot(ws)
    capsys.readouterr()
    status = _cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, (status, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    after = _snapshot(ws)
    assert {k: after.get(k) for k in before} == before, "a file present before the command changed"


# ---- beyond refusals: fallbacks, signals, locks, non-finite weights, resources -----------------


def test_resume_and_sample_fall_back_past_a_tampered_newest_step_saying_so(ws, capsys):
    newest = _steps(ws / "toy")[-1]
    _flip_bit(newest / "ema.safetensors")
    assert _cli(["sample", "--run", ws / "toy", "--out", ws / "s", "--n", "4"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.safetensors does not match the SHA-256" in err[0] and "step_00000003" in err[0]
    assert _cli([*TOY[:-4], "--steps", "8", "--save-every", "100", "--out", ws / "toy", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "using the newest intact checkpoint, step_00000003" in err
    assert checkpoint.latest_checkpoint(ws / "toy").name == "step_00000008"


def test_latest_is_a_hint_a_partial_newest_folder_is_passed_over(ws, capsys):
    (ws / "toy/checkpoints/latest").unlink()
    newest = _steps(ws / "toy")[-1]
    (newest / "ema.safetensors").unlink()  # a step folder left half-copied
    with pytest.warns(UserWarning, match="ema.safetensors is missing"):
        assert checkpoint.latest_checkpoint(ws / "toy").name == "step_00000003"


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys):
    status = _cli([*TOY[:-4], "--steps", "40", "--save-every", "1", "--lr", "1e30", "--out", tmp_path / "run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and ("non-finite" in err[0] or "loss is" in err[0]), err
    for step in _steps(tmp_path / "run"):  # whatever was written verifies and loads
        integrity.verify(step)
        for name in ("model", "ema"):
            integrity.check_finite(load_file(step / f"{name}.safetensors"), name)


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpoint.save_checkpoint(tmp_path, 1, model=model)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="not checkpointed; the newest checkpoint stays step_00000001"):
        checkpoint.save_checkpoint(tmp_path, 2, model=model)
    assert [p.name for p in _steps(tmp_path)] == ["step_00000001"]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=f"stale lock of pid {int(dead.stdout)}"), RunLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_second_lock_names_the_holder(tmp_path):
    with RunLock(tmp_path), pytest.raises(ValueError, match=f"in use by another training \\(pid {os.getpid()}"):
        RunLock(tmp_path).acquire()


def test_the_first_signal_asks_to_stop_the_second_stops_at_once():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.exit_status == 130 and "without a new checkpoint" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


_TRAIN = [sys.executable, "-m", "unnoise", *TOY[:-4], "--steps", "1000000", "--save-every", "100000"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_prints_the_resume_hint_and_exits(tmp_path, signum, status):
    run = tmp_path / "run"
    child = subprocess.Popen([*_TRAIN, "--out", str(run)], stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    for _ in range(600):  # until it is training (the log's first line)
        if log.exists() and log.stat().st_size:
            break
        child.poll() is None or pytest.fail(child.stderr.read())
        subprocess.run(["sleep", "0.1"])
    child.send_signal(signum)
    err = child.communicate(timeout=120)[1].strip().splitlines()
    assert child.returncode == status, err
    assert len(err) == 1 and f"stopped by {signal.Signals(signum).name}; saved step_" in err[0], err
    assert "rerun with --resume to continue from its checkpoint step_" in err[0]
    step = checkpoint.latest_checkpoint(run)
    assert step is not None and err[0].split("saved ")[1].startswith(step.name)
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_two_trainings_on_one_run_one_wins_the_other_is_refused(tmp_path):
    argv = [*_TRAIN[:-4], "--steps", "300", "--save-every", "100", "--out", str(tmp_path / "run")]
    children = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((c.wait(timeout=300), c.stderr.read().strip()) for c in children)
    assert [r[0] for r in results] == [0, 2], results
    refusal = results[1][1].splitlines()
    assert len(refusal) == 1 and ("in use by another training" in refusal[0] or "holds a run" in refusal[0])
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step_00000300"


def test_a_full_disk_mid_training_is_one_line_and_the_previous_checkpoint_survives(tmp_path, capsys, monkeypatch):
    import errno

    from unnoise.training import files

    real, calls = files.save_tensors, []

    def save_tensors(path, tensors):
        calls.append(path)
        if "step_00000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tensors)

    monkeypatch.setattr(checkpoint, "save_tensors", save_tensors)
    assert _cli([*TOY, "--out", tmp_path / "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unnoise train: error: No space left on device"), err
    assert "rerun with --resume to continue from its checkpoint step_00000003" in err[0]
    assert [p.name for p in _steps(tmp_path / "run")] == ["step_00000003"]
    integrity.verify(_steps(tmp_path / "run")[0])


def test_out_of_memory_while_sampling_is_one_line(ws, capsys, monkeypatch):
    from unnoise.modalities.toy import modality

    def sample(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB")

    monkeypatch.setattr(modality.MODALITY, "sample", sample)
    assert _cli(["sample", "--run", ws / "toy", "--out", ws / "s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "try a smaller --n or --nfe" in err[0], err


def test_overwrite_starts_a_run_over_and_replaces_sample_files(ws, capsys):
    assert _cli([*TOY[:-4], "--steps", "2", "--save-every", "1", "--out", ws / "toy", "--overwrite"]) == 0
    assert [p.name for p in _steps(ws / "toy")] == ["step_00000001", "step_00000002"]
    assert _cli(["sample", "--run", ws / "toy", "--out", ws / "old", "--n", "4", "--overwrite"]) == 0
    assert (ws / "old.png").read_bytes() != b"an earlier result"
