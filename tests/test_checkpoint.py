"""The run folder: exact round trips, bit-identical resume (also after kill -9), atomicity, no pickle."""

import copy
import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import unnoise.training.checkpoint as ckpt
from unnoise.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_config,
    load_model_weights,
    save_checkpoint,
    save_config,
)

N_STEPS, EVERY = 12, 4


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))


def _parts(seed: int = 0):
    """A model, its EMA, AdamW and the data generator: the objects a trainer checkpoints."""
    torch.manual_seed(seed)
    model = _net()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return model, ema, opt, {"data": torch.Generator().manual_seed(seed + 1)}


def _train_step(model, ema, opt, gens, state) -> None:
    """One step that draws from every RNG stream: data order (state), torch generator, global torch
    (dropout), numpy and python random; a data epoch is a permutation drawn at its start."""
    if state["position"] == len(state["order"]):
        state.update(order=torch.randperm(20, generator=gens["data"]), position=0, epoch=state["epoch"] + 1)
    idx = state["order"][state["position"] : state["position"] + 4]
    state["position"] += len(idx)
    x = torch.randn(len(idx), 3, generator=gens["data"]) + idx[:, None]
    scale = random.random() + float(np.random.rand())  # noqa: NPY002
    loss = (model(x) * scale).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 0.1)
    state["losses"].append(loss.item())


def _fresh_state():
    return {"order": torch.arange(20), "position": 20, "epoch": -1, "losses": []}


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the global stream is what the checkpoint must restore)


def train(run: Path, n_steps: int = N_STEPS, every: int = EVERY, keep: int = 2) -> nn.Module:
    """A toy trainer with --resume semantics: continue from the run's latest checkpoint if any."""
    model, ema, opt, gens = _parts()
    _seed_globals(1)
    state, step = _fresh_state(), 0
    if run.is_dir() and latest_checkpoint(run) is not None:
        _seed_globals(99)  # a different process: its global RNG must not matter
        state = load_checkpoint(run, model=model, ema=ema, optimizer=opt, generators=gens)
        step = state.pop("step")
    while step < n_steps:
        _train_step(model, ema, opt, gens, state)
        step += 1
        if step % every == 0:
            save_checkpoint(run, step, model=model, ema=ema, optimizer=opt, state=state, generators=gens, keep=keep)
    return model


def _assert_same(a, b) -> None:
    """Exact equality of nested trees: types, tensor dtypes and bits."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _trained(tmp_path: Path):
    model, ema, opt, gens = _parts()
    state = _fresh_state()
    for _ in range(3):
        _train_step(model, ema, opt, gens, state)
    state["meta"] = {"pair": (1, 2.5), 3: None, "nan": float("inf")}
    save_checkpoint(tmp_path, 3, model=model, ema=ema, optimizer=opt, state=state, generators=gens)
    return model, ema, opt, gens, state


# ---- round trips and exact resume -------------------------------------------------------------


def test_round_trip_restores_every_tensor_and_rng_stream(tmp_path):
    model, ema, opt, gens, state = _trained(tmp_path)
    rng_before = ckpt.rng_state(gens)
    model2, ema2, opt2, gens2 = _parts(seed=5)
    _seed_globals(7)
    loaded = load_checkpoint(tmp_path, model=model2, ema=ema2, optimizer=opt2, generators=gens2)
    _assert_same(model2.state_dict(), model.state_dict())
    _assert_same(ema2.state_dict(), ema.state_dict())
    _assert_same(opt2.state_dict(), opt.state_dict())
    _assert_same(loaded, {**state, "step": 3})
    _assert_same(ckpt.rng_state(gens2), rng_before)
    assert sorted(p.name for p in (tmp_path / "checkpoints/step_00000003").iterdir()) == [
        "ema.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.json",
        "rng.safetensors",
        "state.json",
        "state.safetensors",
    ]


def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = train(tmp_path / "straight")
    train(tmp_path / "resumed", n_steps=EVERY * 2)  # stops; a new "process" picks up
    resumed = train(tmp_path / "resumed")
    _assert_same(resumed.state_dict(), straight.state_dict())
    a = load_checkpoint(tmp_path / "straight", model=_net())
    b = load_checkpoint(tmp_path / "resumed", model=_net())
    _assert_same(a, b)  # losses, data order, epoch: the same trajectory


_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_checkpoint as t
crash = int(sys.argv[2])
if crash:  # kill -9 this process at the moment the step folder would be renamed into place
    real = os.replace
    def replace(src, dst):
        if os.path.basename(dst) == f"step_{{crash:08d}}":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
model = t.train(t.Path(sys.argv[1]))
t.safetensors.torch.save_file(model.state_dict(), sys.argv[1] + "-final.safetensors")
"""


@pytest.mark.slow
def test_a_run_killed_with_sigkill_mid_save_resumes_bit_identically(tmp_path):
    run = str(tmp_path / "run")
    child = [sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent))]
    killed = subprocess.run([*child, run, str(EVERY * 2)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(run).name == f"step_{EVERY:08d}"  # the half-written one never became visible
    assert list((tmp_path / "run/checkpoints").glob(".tmp-*"))  # ...it was left as a temp folder
    done = subprocess.run([*child, run, "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))
    final = safetensors.torch.load_file(run + "-final.safetensors")
    straight = train(tmp_path / "straight").state_dict()
    _assert_same(final, {k: straight[k] for k in final})  # safetensors sorts keys


def test_keeps_the_last_k_and_latest_names_the_newest(tmp_path):
    model = nn.Linear(2, 2)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep=2)
        assert latest_checkpoint(tmp_path).name == f"step_{step:08d}"
    assert [p.name for p in ckpt._step_folders(tmp_path / "checkpoints")] == ["step_00000004", "step_00000005"]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000005\n"
    save_checkpoint(tmp_path, 5, model=model, keep=1)  # re-saving a step replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000005"]


@pytest.mark.parametrize("where", ["save_tree", "replace", "atomic_write_text"])
def test_a_crash_mid_save_leaves_an_intact_newest_checkpoint(tmp_path, monkeypatch, where):
    model, ema, opt, gens, _ = _trained(tmp_path)
    expected = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    target = ckpt.os if where == "replace" else ckpt
    monkeypatch.setattr(target, where, crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, model=model, ema=ema, optimizer=opt, generators=gens)
    monkeypatch.undo()
    if where == "atomic_write_text":  # only `latest` was not updated: step 4 is whole, verified and newest
        expected, step = model.state_dict(), 4
    else:
        step = 3
    assert latest_checkpoint(tmp_path).name == f"step_{step:08d}"
    fresh, *_ = _parts(seed=3)
    assert load_checkpoint(tmp_path, model=fresh)["step"] == step
    _assert_same(fresh.state_dict(), expected)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ---- refusals: pickles, damaged files, missing things ------------------------------------------


def test_load_model_weights_reads_a_file_a_step_folder_or_a_run(tmp_path):
    model, ema, *_ = _trained(tmp_path)
    step = tmp_path / "checkpoints/step_00000003"
    for path, which, ref in [(step / "model.safetensors", "model", model), (step, "ema", ema), (tmp_path, "ema", ema)]:
        _assert_same(load_model_weights(path, _net(), which=which).state_dict(), ref.state_dict())


@pytest.mark.parametrize("writer", ["torch.save", "pickle", "legacy torch.save"])
def test_a_pickle_is_refused_with_a_clear_error(tmp_path, writer):
    model, *_ = _trained(tmp_path)
    path = tmp_path / "checkpoints/step_00000003/model.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(model.state_dict()))
    else:
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=writer == "torch.save")
    _without_manifests(tmp_path)  # the reader's own defence, as for a run written before manifests
    for load in (lambda: load_model_weights(path, _net()), lambda: load_checkpoint(tmp_path, model=_net())):
        with pytest.raises(ValueError, match="holds a pickle/torch.save archive; unnoise loads only safetensors"):
            load()


def _without_manifests(run: Path) -> None:
    for manifest in (run / "checkpoints").glob("step_*/manifest.json"):
        manifest.unlink()


def _tamper(path: Path, how: str) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "header length":
        data = (n + 1000).to_bytes(8, "little") + data[8:]
    elif how == "header json":
        data = data[:8] + b"#" + data[9:]
    elif how == "shape":
        header = json.loads(data[8 : 8 + n])
        header["0.weight"]["shape"][0] += 1
        text = json.dumps(header).encode().ljust(n)
        data = data[:8] + text[:n] + data[8 + n :]
    elif how == "trailing bytes":
        data += b"\0" * 16
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "empty", "header length", "header json", "shape", "trailing bytes"])
def test_a_damaged_safetensors_file_gives_one_value_error_naming_it(tmp_path, how):
    _trained(tmp_path)
    path = tmp_path / "checkpoints/step_00000003/model.safetensors"
    _tamper(path, how)
    with pytest.raises(ValueError, match="model.safetensors does not match the SHA-256 in its manifest"):
        load_model_weights(path, _net())
    _without_manifests(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file") as e:
        load_model_weights(path, _net())
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_model_that_does_not_fit_lists_the_keys(tmp_path):
    _trained(tmp_path)
    other = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 5), nn.Linear(5, 2))
    with pytest.raises(
        ValueError, match=r"missing \['1.bias', '1.weight'\], unexpected \[\], .*'2.weight \(2, 8\) vs \(2, 5\)'"
    ):
        load_checkpoint(tmp_path, model=other)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder at"):
        load_checkpoint(tmp_path / "nope", model=_net())
    for f in (latest_checkpoint, load_config):
        with pytest.raises(FileNotFoundError, match="no run folder at"):
            f(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path, model=_net())
    model, ema, opt, gens, _ = _trained(tmp_path)
    (tmp_path / "checkpoints/step_00000003/optimizer.json").unlink()
    with pytest.raises(ValueError, match="optimizer.json is missing"):
        load_checkpoint(tmp_path, model=model, optimizer=opt)
    without_ema = save_checkpoint(tmp_path, 4, model=model)
    with pytest.raises(FileNotFoundError, match="ema.safetensors is missing"):
        load_checkpoint(without_ema, model=model, ema=ema)
    with pytest.raises(ValueError, match="no state for generator 'noise'"):
        load_checkpoint(tmp_path / "checkpoints/step_00000004", model=model, generators={"noise": torch.Generator()})


def test_state_that_needs_pickle_is_refused_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match=r"cannot store 'when' of type object without pickle"):
        save_checkpoint(tmp_path, 1, model=_net(), state={"when": object()})
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").iterdir())


def test_config_round_trip_and_bad_json(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Config:
        lr: float = 1e-3
        sizes: tuple = (1, 2)

    save_config(tmp_path, Config())
    assert load_config(tmp_path) == {"lr": 1e-3, "sizes": [1, 2]}
    save_config(tmp_path, {"name": "run", "steps": 10})
    assert load_config(tmp_path) == {"name": "run", "steps": 10}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(ValueError, match="config must be JSON-able"):
        save_config(tmp_path, {"f": os})
    (tmp_path / "config.json").write_text('{"name": "run",')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_config(tmp_path)
