"""Several processes (gloo on CPU) give the results of one: training, resume, sampling, evaluation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from unnoise.modalities.image.data import load_images, to_model
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.training import distributed
from unnoise.training.checkpoint import latest_checkpoint
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import Draws, Shard
from unnoise.training.loop import train
from unnoise.training.objectives import Encoded, make_objective


def test_rows_split_a_global_batch_in_rank_order():
    parts = [Shard(r, 4).rows(64) for r in range(4)]
    assert [(p.start, p.stop) for p in parts] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    with pytest.raises(ValueError, match="multiple of the number of processes 3"):
        Shard(0, 3).rows(64)


def test_chunks_cover_the_range_once_whatever_the_world():
    for world in (1, 2, 3, 5):
        seen = sorted(i for r in range(world) for c in Shard(r, world).chunks(23, 4) for i in c)
        assert seen == list(range(23))
    assert Shard(1, 2).chunks(23, 4) == [range(4, 8), range(12, 16), range(20, 23)]


def test_draws_of_the_ranks_are_one_process_draws():
    def draw(shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        d = Draws(g, 8, shard)
        out = torch.cat([d.rand(), d.randn(3).flatten(), d.randint(1, 100).double()])
        return out, g.get_state()

    whole, state = draw(Shard())
    parts = [draw(Shard(r, 2)) for r in range(2)]
    for r, (part, part_state) in enumerate(parts):
        assert torch.equal(part_state, state)  # the generator ends in the same state on every rank
        rows = slice(4 * r, 4 * r + 4)
        g = torch.Generator().manual_seed(5)
        expected = torch.cat(
            [
                torch.rand(8, generator=g)[rows],
                torch.randn(8, 3, generator=g)[rows].flatten(),
                torch.randint(1, 100, (8,), generator=g)[rows].double(),
            ]
        )
        assert torch.equal(part, expected)
    assert torch.equal(parts[0][0][:4], whole[:4])


def test_what_counts_as_another_process_failing(monkeypatch):
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer.")
    assert distributed.is_group_failure(distributed.Stopped("stopped by the launcher (SIGTERM)"))
    assert not distributed.is_group_failure(reset)  # one process: no group to fail
    monkeypatch.setattr(distributed, "current", lambda: Shard(0, 2))
    assert distributed.is_group_failure(reset)
    assert not distributed.is_group_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.is_group_failure(ValueError("gloo"))


# --- several processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    torch.set_num_threads(1)  # the same kernels whatever the number of processes
    distributed.init(timeout_s=120)
    try:
        fn(*args)
        # every rank is done before any tears the group down: once (in one full run of the suite) a
        # rank aborted at the end ("terminate called without an active exception", SIGABRT), read as
        # one rank destroying its gloo group while its peer still used it
        distributed.barrier()
    finally:
        distributed.close()


def spawn(world: int, fn, *args) -> None:
    """``fn(*args)`` on ``world`` processes of one gloo group (world 1: in a process of its own too)."""
    mp.spawn(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _config(steps: int, batch: int) -> TrainConfig:
    return TrainConfig(
        model="tiny", T=50, steps=steps, batch_size=batch, lr=2e-3, warmup=2, save_every=2, log_every=1, seed=3
    )


def _train_float64(run: Path, steps: int, batch: int, resume: bool = False, stop_at: int | None = None) -> None:
    """A tiny U-Net (no dropout) in float64 on 8x8 digits, class-conditional with label dropout."""
    digits = load_images("digits")
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", 8, 1, num_classes=10)).double()
    cfg = _config(steps, batch)
    stop = None if stop_at is None else (lambda step: step >= stop_at)
    x0 = to_model(digits.images[:96]).double()
    objective = make_objective(cfg, lambda model, x: Encoded(x, model), torch.tensor(10))
    ema = train(cfg, run, net, x0, digits.labels[:96], loss_fn=objective, resume=resume, progress=False, stop=stop)
    # Every rank holds the same weights and EMA (rank 0's are the ones checkpointed).
    mine = torch.cat([p.detach().flatten() for m in (net, ema) for p in m.parameters()])
    assert torch.equal(distributed.gather_rows(mine[None]), mine[None].expand(distributed.current().world, -1))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = latest_checkpoint(run)
    return {f"{k}/{name}": v for k in ("model", "ema") for name, v in load_file(folder / f"{k}.safetensors").items()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(tmp_path):
    """2 processes x 16 rows = 1 process x 32 rows: same weights and EMA, float64, 5 steps."""
    spawn(1, _train_float64, tmp_path / "one", 5, 32)
    spawn(2, _train_float64, tmp_path / "two", 5, 32)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_difference(one, two) < 1e-12
    assert _max_difference(one, _weights_at_start()) > 1e-3  # it did train
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(log) == 5  # rank 0 alone writes the log
    # A run resumes on another number of processes: 2 processes to step 2, then 1 to step 5.
    spawn(2, _train_float64, tmp_path / "switch", 5, 32, False, 2)
    assert latest_checkpoint(tmp_path / "switch").name == "step_00000002"
    spawn(1, _train_float64, tmp_path / "switch", 5, 32, True)
    assert _max_difference(one, _weights(tmp_path / "switch")) < 1e-12


def _weights_at_start() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", 8, 1, num_classes=10)).double()
    return {f"{k}/{n}": p.detach() for k in ("model", "ema") for n, p in net.state_dict().items()}


def _sample_and_score(run: Path, out: Path) -> None:
    from unnoise.modalities.image.metrics import eval_bpd
    from unnoise.modalities.image.pipeline import sample_images_sharded
    from unnoise.modalities.run import load_run

    loaded = load_run(run)
    images, labels = sample_images_sharded(loaded, n=11, batch_size=4, sampler="dpmpp_2m_sde", nfe=6, seed=7)
    bpd = eval_bpd(loaded, n=12, batch_size=5)
    if distributed.current().main:
        np.savez(out, images=images.numpy(), labels=labels.numpy(), bpd=np.array(bpd))


@pytest.mark.slow
def test_sharded_sampling_and_bits_per_dim_do_not_depend_on_the_number_of_processes(tmp_path):
    from unnoise.modalities.run import train

    cfg = TrainConfig(data="digits", model="tiny", T=40, steps=3, batch_size=16, save_every=3)
    train("image", cfg, tmp_path / "run", progress=False)
    for world in (1, 2, 3):
        spawn(world, _sample_and_score, tmp_path / "run", tmp_path / f"w{world}.npz")
    results = [np.load(tmp_path / f"w{world}.npz") for world in (1, 2, 3)]
    for r in results[1:]:
        assert np.array_equal(r["images"], results[0]["images"])
        assert np.array_equal(r["labels"], results[0]["labels"])
        np.testing.assert_allclose(r["bpd"], results[0]["bpd"], rtol=0, atol=1e-12)
    assert results[0]["images"].shape == (11, 1, 8, 8)


# --- torchrun, end to end ---------------------------------------------------------------------


def _torchrun(n: int, *args: str, **kw) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        str(_free_port()),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, "-m", "unnoise", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **kw
    )


@pytest.mark.slow
def test_torchrun_train_and_sample_and_kill_9_of_one_rank(tmp_path):
    run = tmp_path / "run"
    train_args = ["train", "image", "--data", "digits", "--model", "tiny", "--batch-size", "16", "--out", str(run)]
    job = _torchrun(2, *train_args, "--steps", "4000", "--save-every", "5")
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step_00000010").is_dir():
        time.sleep(0.2)
    assert (run / "checkpoints" / "step_00000010").is_dir(), job.communicate()[1][-2000:]
    rank1 = [p for p in _children(job.pid) if "RANK=1" in _environ(p)]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("unnoise train: error: rank 0 of 2")]
    assert ours and "another process of the group failed" in ours[0] and "rerun with --resume" in ours[0], err[-3000:]
    last = latest_checkpoint(run)
    # Resume on one process: it continues from the last checkpoint (at most one interval lost).
    done = subprocess.run(
        [sys.executable, "-m", "unnoise", *train_args, "--steps", str(int(last.name[5:]) + 3), "--resume"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = [line for line in (run / "log.jsonl").read_text().splitlines() if line]
    assert int(latest_checkpoint(run).name[5:]) == int(last.name[5:]) + 3
    assert log
    # Sampling under torchrun writes what one process writes.
    sample = ["sample", "--run-dir", str(run), "--count", "9", "--nfe", "4", "--seed", "2"]
    two = _torchrun(2, *sample, "--out", str(tmp_path / "two"))
    _, err = two.communicate(timeout=120)
    assert two.returncode == 0, err[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "unnoise", *sample, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""
