import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unnoise.modalities.run import train
from unnoise.training import distributed
from unnoise.training.checkpoint import latest_checkpoint, read_safetensors
from unnoise.training.config import TrainConfig
from unnoise.training.loop import Batches, CPUBudget, TrainState, ema_decay, learning_rate


def tiny(**kw) -> TrainConfig:
    base = dict(data="digits", model="tiny", T=100, steps=6, batch_size=16, save_every=3, log_every=2, lr=1e-3)
    return TrainConfig(**(base | kw))


def test_config_is_checked():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown loss 'l1'; allowed: simple, hybrid, vlb, min_snr"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match=r"p_uncond must lie in \[0, 1\)"):
        TrainConfig(p_uncond=1.0)


def test_cpu_budget_is_shared_between_processes(monkeypatch):
    cores = os.cpu_count() or 1
    assert CPUBudget(2).seconds == 2 * 60 * cores  # one process: all the machine's cores
    monkeypatch.setattr(distributed, "current", lambda: distributed.Shard(1, 4))
    assert CPUBudget(2).seconds == 2 * 60 * cores / 4  # each of 4 torchrun processes: a quarter


def test_cosine_decay():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_decay="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)  # warm-up as with a constant rate
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)  # the peak, at the end of warm-up
    assert learning_rate(cfg, 60) == pytest.approx(0.5e-3)  # half way: cos(pi / 2) = 0
    assert learning_rate(cfg, 35) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    for step in (110, 500):  # 0 at `steps` and after it
        assert learning_rate(cfg, step) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear")


def test_warmups():
    cfg = TrainConfig(lr=1e-3, warmup=10, ema_decay=0.999)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 50) == 1e-3
    assert ema_decay(cfg, 0) == pytest.approx(0.1) and ema_decay(cfg, 10**6) == 0.999


def test_batches_are_a_function_of_seed_epoch_and_position():
    a, b = Batches(10, 4, seed=3), Batches(10, 4, seed=3)
    s1, s2 = TrainState(), TrainState()
    seq = [a.next(s1).tolist() for _ in range(5)]
    assert s1.epoch == 2 and sorted(seq[0] + seq[1]) == sorted(set(seq[0] + seq[1]))  # no repeats in an epoch
    # jump straight to the third batch: same indices
    s2.epoch, s2.position = 1, 0
    assert b.next(s2).tolist() == seq[2]


def test_training_writes_log_checkpoints_and_samples(tmp_path):
    train("image", tiny(), tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6] and all(r["loss"] > 0 for r in lines)
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert (tmp_path / "samples" / "step_00000006.png").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["net"]["num_classes"] == 10


@pytest.mark.parametrize(
    "settings",
    [{}, {"T": 4, "timestep_sampling": "loss_aware"}],  # T = 4: the loss-aware sampler is warm by step 3
    ids=["uniform", "loss_aware"],
)
def test_resume_continues_exactly(tmp_path, settings):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train("image", tiny(**settings), straight, progress=False)
    train("image", tiny(steps=3, **settings), resumed, progress=False)
    train("image", tiny(**settings), resumed, resume=True, progress=False)
    for name in ("model", "ema"):
        a = read_safetensors(latest_checkpoint(straight) / f"{name}.safetensors")
        b = read_safetensors(latest_checkpoint(resumed) / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train("image", tiny(), tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_kill_9_and_resume_ends_bit_identical(tmp_path):
    """The issue's promise: kill -9 mid-run, --resume, and the weights equal an uninterrupted run's."""
    cmd = [sys.executable, "-m", "unnoise", "train", "image", "--data", "digits", "--model", "tiny"]
    cmd += ["--steps", "40", "--batch-size", "16", "--save-every", "10", "--config"]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"T": 100, "log_every": 5}))
    cmd.append(str(settings))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "a")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        step = latest_checkpoint(tmp_path / "b") if (tmp_path / "b").exists() else None
        if step is not None and step.name >= "step_00000020":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path / "b").name < "step_00000040"  # it really was cut short
    subprocess.run([*cmd, "--out", str(tmp_path / "b"), "--resume"], check=True, env=env, capture_output=True)
    a = read_safetensors(latest_checkpoint(tmp_path / "a") / "ema.safetensors")
    b = read_safetensors(latest_checkpoint(tmp_path / "b") / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
