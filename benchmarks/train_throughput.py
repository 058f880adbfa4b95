"""Training throughput on Fashion-MNIST 28x28, batch 64, CPU: unnoise's U-Net against diffusers'.

diffusers' UNet2DModel is configured to match the "small" preset in width, depth, attention and
parameter count; both train with AdamW (unnoise's fused, as its trainer steps it) on the same
batches with the same eps-MSE loss. Each configuration runs in its own process (so peak RSS is
its own) and prints images/s, the mean loss over the last steps, peak memory, the FLOP
utilisation against the machine's measured fp32 and bf16 matmul peaks, and the seconds of its 5
warm-up steps (not timed; for "compiled", torch.compile's one-time cost).

Run: python benchmarks/train_throughput.py [--steps 60] [--threads 1] [--configs NAME ...] [--repeats 3]
(needs apt-get install dataset-fashion-mnist)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {
    "diffusers fp32": dict(side="diffusers", bf16=False, channels_last=False),
    "unnoise fp32": dict(side="unnoise", bf16=False, channels_last=False),
    "unnoise fp32 channels-last": dict(side="unnoise", bf16=False, channels_last=True),
    "unnoise bf16": dict(side="unnoise", bf16=True, channels_last=False),
    "unnoise bf16 channels-last": dict(side="unnoise", bf16=True, channels_last=True),
    # unnoise train --bf16 --compile: torch.compile's one-time cost is the "warm-up s" column
    "unnoise bf16 compiled": dict(side="unnoise", bf16=True, channels_last=False, compile=True),
}


def build(side: str) -> torch.nn.Module:
    if side == "unnoise":
        from unnoise.nets.unet import UNet, UNetConfig

        return UNet(UNetConfig.preset("small", 28, 1))
    import diffusers

    return diffusers.UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        resnet_time_scale_shift="scale_shift",
        dropout=0.1,
    )


def call(net, side: str, x, t):
    return net(x, t).sample if side == "diffusers" else net(x, t)


def run_one(name: str, steps: int, warmup: int = 5) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from unnoise.modalities.image.data import load_fashion_mnist, to_model
    from unnoise.schedules import make_schedule

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    net = build(cfg["side"])
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    net = net.to(memory_format=fmt)
    # unnoise's trainer steps a fused AdamW; diffusers' train_unconditional example the default one
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=cfg["side"] == "unnoise")
    data = to_model(load_fashion_mnist("train").images[: 64 * (steps + warmup)])
    ab = make_schedule("cosine", 1000).alpha_bar.float()
    g = torch.Generator().manual_seed(1)

    def step(i: int) -> float:
        x0 = data[64 * i : 64 * (i + 1)].contiguous(memory_format=fmt)
        t = torch.randint(1, 1001, (64,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
            out = call(net, cfg["side"], x_t, t.float() - float(cfg["side"] == "diffusers"))
        loss = (out.float() - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    with FlopCounterMode(display=False) as counter:  # eager: the same FLOPs as a compiled step
        step(0)
    flops = counter.get_total_flops()
    if cfg.get("compile"):
        net.compile()
    start = time.perf_counter()
    for i in range(1, warmup + 1):
        step(i)
    warmup_s = time.perf_counter() - start
    losses, start = [], time.perf_counter()
    for i in range(warmup + 1, warmup + steps):
        losses.append(step(i))
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "params": sum(p.numel() for p in net.parameters()),
        "images_per_s": 64 * (steps - 1) / seconds,
        "flops_per_s": flops * (steps - 1) / seconds,
        "loss": sum(losses[-10:]) / len(losses[-10:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "warmup_s": warmup_s,
    }


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """The best of ``trials`` timings of ``repeats`` n x n matmuls, in FLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                        help="configurations to run (diffusers fp32 always runs: it is the reference)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved; median reported")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peaks (2048^3): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    # --repeats N runs every configuration N times, interleaved (diffusers, unnoise..., diffusers, ...),
    # and reports the median images/s: on a shared machine other load comes and goes within minutes,
    # and interleaving spreads it over both sides instead of over whichever ran at the time
    names = ["diffusers fp32"] + [c for c in args.configs if c != "diffusers fp32"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--one", name, "--steps", str(args.steps)]
                + (["--threads", str(args.threads)] if args.threads else []),
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(f"{name}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for results in runs.values():
        if results:
            rates = sorted(r["images_per_s"] for r in results)
            median = next(r for r in results if r["images_per_s"] == rates[len(rates) // 2])
            rows.append(median | {"all_images_per_s": [r["images_per_s"] for r in results]})
    ref = next(r for r in rows if r["name"] == "diffusers fp32")
    header = f"| config | params | images/s (median of {args.repeats}) | x diffusers | loss (last 10 of {args.steps}) "
    print("\n" + header + "| peak RSS MB | FLOP util | warm-up s | images/s, each run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = peaks["bf16" if "bf16" in r["name"] else "fp32"]
        print(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['images_per_s']:.0f} | "
            f"{r['images_per_s'] / ref['images_per_s']:.2f} | {r['loss']:.4f} | {r['peak_rss_mb']:.0f} | "
            f"{r['flops_per_s'] / peak:.1%} | {r['warmup_s']:.0f} | "
            f"{', '.join(f'{v:.0f}' for v in r['all_images_per_s'])} |"
        )
    best = max((r for r in rows if r["name"] != "diffusers fp32"), key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / ref["images_per_s"]
    verdict = "met" if ratio >= 2 else "MISSED"
    print(f"\nbest unnoise: {best['name']}, {ratio:.2f}x diffusers fp32 (goal >= 2x): {verdict}")


if __name__ == "__main__":
    main()
