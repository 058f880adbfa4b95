"""Training throughput with 1 and 2 processes (torchrun, DDP over gloo) on this machine.

Each configuration is the real command, ``torchrun --nproc_per_node N -m unnoise train image``
(Fashion-MNIST 28x28, the small U-Net, global batch 64), with the machine's cores split evenly
between the processes (OMP_NUM_THREADS = cores / N), so every row uses the same hardware.
Images/s come from rank 0's log (global batch x steps / time), the first window dropped as
warm-up. Scaling efficiency = images/s with N processes / images/s with 1, ideal 1.00 here
(the same cores); across machines it is N x that. The all-reduce row times one gradient
all-reduce (the model's parameter count in float32) between 2 gloo processes.

Run: python benchmarks/ddp_throughput.py [--steps 100]   (needs apt-get install dataset-fashion-mnist)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(processes: int, steps: int, bf16: bool, out: Path) -> float:
    cores = os.cpu_count() or 1
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // processes))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd += ["-m", "unnoise", "train", "image", "--data", "fashion-mnist", "--model", "small", "--batch-size", "64"]
    cmd += ["--steps", str(steps), "--save-every", str(10 * steps), "--out", str(out)]
    cmd += ["--bf16"] if bf16 else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    windows = log[1:] or log
    return sum(r["images_per_s"] for r in windows) / len(windows)


def _allreduce_worker(rank: int, port: int, numel: int, result: Path) -> None:
    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(x)
    if rank == 0:
        result.write_text(str((time.perf_counter() - start) / 10))
    dist.destroy_process_group()


def allreduce_seconds(numel: int) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "t"
        mp.spawn(_allreduce_worker, args=(port, numel, result), nprocs=2, join=True)
        return float(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    from unnoise.nets.unet import UNet, UNetConfig

    params = sum(p.numel() for p in UNet(UNetConfig.preset("small", 28, 1, 10)).parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (False, True):
            for n in (1, 2):
                rate = run(n, args.steps, bf16, Path(tmp) / f"{n}-{bf16}")
                rows.append((n, bf16, rate))
    cores = os.cpu_count() or 1
    print(f"\n{cores} cores; small U-Net ({params / 1e6:.2f}M parameters), Fashion-MNIST, global batch 64")
    print("| processes | threads each | precision | images/s | scaling efficiency |")
    print("|---|---|---|---|---|")
    for n, bf16, rate in rows:
        base = next(r for m, b, r in rows if m == 1 and b == bf16)
        print(f"| {n} | {max(1, cores // n)} | {'bf16' if bf16 else 'fp32'} | {rate:.0f} | {rate / base:.2f} |")
    seconds = allreduce_seconds(params)
    size = f"{params * 4 / 1e6:.1f} MB float32"
    print(f"\none gradient all-reduce ({size}) between 2 gloo processes: {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
