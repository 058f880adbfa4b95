"""The training loop: any dataset of tensors, any network, any objective.

One step: a batch in a fixed per-epoch order, the objective (:mod:`unnoise.training.objectives`:
DDPM family or EDM, with label dropout for classifier-free guidance and bf16 autocast), AdamW
with linear warm-up, gradient clipping and accumulation, EMA with warm-up, and optionally the
power-function EMAs of post-hoc EMA with their snapshots (:mod:`unnoise.training.posthoc_ema`).
The data order is a function of (seed, epoch) and every other random draw comes from one
generator checkpointed with the weights, so ``resume`` continues exactly: a run killed with
kill -9 and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unnoise.schema import from_dict
from unnoise.training import distributed, runfolder
from unnoise.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_config
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import Draws
from unnoise.training.lock import RunInUse, RunLock
from unnoise.training.posthoc_ema import PowerEMA
from unnoise.training.signals import Interrupted, StopSignals

Objective = Callable[[nn.Module, Tensor, Tensor, Draws], Tensor]  # (net, x0, labels, draws) -> loss


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # index into this epoch's permutation


class CPUBudget:
    """A training budget in process CPU seconds: ``minutes`` of all the machine's cores. Other load
    on the machine slows a run but does not shorten it. Pass it as ``train(stop=...)``.

    Under torchrun (create it after :func:`unnoise.training.distributed.init`) each of the W processes gets
    1/W of it, so the processes together spend the same CPU time as one would; ``train`` stops
    them all when the first runs out."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60 * (os.cpu_count() or 1) / distributed.current().world
        self.start, self.wall = time.process_time(), time.perf_counter()

    def __call__(self, step: int) -> bool:
        return time.process_time() - self.start >= self.seconds

    def used(self) -> dict[str, float]:
        return {"cpu_s": time.process_time() - self.start, "wall_s": time.perf_counter() - self.wall}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then constant (the EMA does the averaging) or, with
    ``lr_decay="cosine"``, half a cosine from ``lr`` at the end of warm-up to 0 at ``cfg.steps``
    (Loshchilov & Hutter 2017, without restarts): a short run ends at a low rate, not mid-stride."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_decay == "constant":
        return cfg.lr * warm
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """EMA warm-up (as in ADM/EDM practice): decay min(d, (1 + step) / (10 + step))."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


class Batches:
    """Minibatches in a permutation per epoch, a pure function of (seed, epoch): resumable anywhere."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def order(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g)
        return self._order

    def next(self, state: TrainState) -> Tensor:
        idx = self.order(state.epoch)[state.position : state.position + self.batch_size]
        state.position += self.batch_size
        if state.position + self.batch_size > self.n:  # drop the ragged end: equal batches
            state.epoch, state.position = state.epoch + 1, 0
        return idx


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    net: nn.Module,
    x0: Tensor,
    labels: Tensor,
    *,
    loss_fn: Objective,
    resume: bool = False,
    overwrite: bool = False,
    on_sample: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
    network: nn.Module | None = None,
) -> nn.Module:
    """Train ``net`` on ``x0`` (N, ...) with labels (N,); returns the EMA network.

    ``loss_fn(net, x0_batch, labels_batch, draws)`` is the objective: a scalar to minimise (a
    mean over the batch), drawing its randomness (t, noise, label dropout) from ``draws``
    (:class:`unnoise.training.distributed.Draws`), whose generator is checkpointed.
    :func:`unnoise.training.objectives.make_objective` makes the DDPM family's or EDM's.
    Writes RUN/config.json, RUN/log.jsonl and checkpoints every ``save_every`` steps and at the end.
    ``stop(step)``, asked after every step, ends training early (a time budget); the step it
    ends on is checkpointed like the last. Under ``cfg.compile`` the module the objective calls,
    ``network`` (default ``net``; e.g. ``model.net`` of a model that also holds a frozen codec), is
    compiled in place with ``torch.compile`` once the EMA copy is made, so the EMA, the previews
    and the saved weights are the plain modules'.

    The run folder must be new or empty, a run to ``resume`` (from its newest intact checkpoint)
    or one to start over (``overwrite``); it is locked while training (a second training on it
    fails with :class:`unnoise.training.lock.RunInUse`). SIGTERM / SIGINT end training after the
    current step, which is checkpointed; then :class:`unnoise.training.signals.Interrupted` is raised.

    Under torchrun (:mod:`unnoise.training.distributed`) each of N processes computes its N-th of every
    global batch of ``cfg.batch_size`` rows and DistributedDataParallel averages the gradients;
    the random numbers, data order, learning rate and EMA are those of one process, so the
    weights equal a single process's up to summation order, and a run may resume on another N.
    (Dropout masks come from the global RNG, seeded per step and rank: a network with dropout
    trains to statistically equivalent, not identical, weights on another N.) Rank 0 writes the
    run folder.
    """
    shard, run = distributed.current(), Path(run_dir)
    lock = RunLock(run)
    error = None
    if shard.main:
        try:
            runfolder.check_out(run, resume=resume, overwrite=overwrite)  # before touching anything
            lock.acquire()
            runfolder.check_out(run, resume=resume, overwrite=overwrite)  # again: another start may have won
        except (ValueError, FileNotFoundError) as e:
            lock.release()
            error = e
    if distributed.mean(float(error is not None)) > 0:  # every rank stops on rank 0's refusal
        raise error if error is not None else RunInUse(f"{run}: rank 0 could not start the run")
    try:
        with StopSignals() as signals:
            args = (cfg, run, net, x0, labels, loss_fn, resume, overwrite, on_sample, progress, stop, signals)
            return _train(*args, network=network if network is not None else net)
    finally:
        lock.release()


def _train(
    cfg, run, net, x0, labels, loss_fn, resume, overwrite, on_sample, progress, stop, signals, network
) -> nn.Module:
    """:func:`train` inside its lock and signal handlers."""
    shard, device = distributed.current(), distributed.device()
    if shard.main and overwrite:
        runfolder.clear_run(run)
    if shard.main:
        run.mkdir(parents=True, exist_ok=True)
    g_noise = torch.Generator().manual_seed(cfg.seed + 1)
    net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    if cfg.compile:  # after the copy: a deep copy of a compiled module would call the original's graph
        network.compile()
    power = PowerEMA(net, cfg.posthoc_ema) if cfg.posthoc_ema else None
    power_state = {"posthoc_ema": list(cfg.posthoc_ema)} if power is not None else {}  # checked on resume
    # fused: one kernel for the whole update (small preset on a CPU: 2.6-6 ms vs 19 ms per step)
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    state = TrainState()
    if resume:
        step = latest_checkpoint(run)
        if step is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {run}")
        where = str(step / "state.json")
        _check_power_ema(step, cfg)
        modules = power.modules if power is not None else None
        saved = load_checkpoint(step, model=net, ema=ema, optimizer=opt, generators={"noise": g_noise}, modules=modules)
        state = from_dict(TrainState, {k: saved.get(k) for k in ("step", "epoch", "position")}, where)
        if min(state.epoch, state.position) < 0:
            raise ValueError(f"{where}: epoch and position must be >= 0, got {state.epoch}, {state.position}")
        if hasattr(loss_fn, "load_state_dict"):
            try:
                loss_fn.load_state_dict(saved.get("objective", {}))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{where}: the objective's state does not fit this run ({e})") from None
    batches = Batches(len(x0), cfg.batch_size, cfg.seed)
    batch = batches.batch_size  # global: every process computes shard.rows(batch) of it
    rows = shard.rows(batch)
    if shard.main:
        save_config(run, {"train": dataclasses.asdict(cfg)} | _net_config(net))
    step_fn: nn.Module = _Step(net, loss_fn)
    if shard.world > 1:
        ids = [device] if device.type == "cuda" else None
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=ids)
    bar = _progress(cfg.steps, state.step, progress and shard.main)
    log = open(run / "log.jsonl", "a", encoding="utf-8") if shard.main else None
    window, t_start = [], time.perf_counter()
    try:
        while state.step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, state.step)
            opt.zero_grad(set_to_none=True)
            # The global RNG (dropout) restarts from (seed, step, rank) every step: resumable
            # without saving it, and different on every rank.
            torch.manual_seed((cfg.seed * 1_000_003 + state.step) * 4099 + shard.rank)
            total = 0.0
            for k in range(cfg.grad_accum):
                idx = batches.next(state)[rows]
                last = k == cfg.grad_accum - 1
                with contextlib.nullcontext() if last or shard.world == 1 else step_fn.no_sync():
                    loss = step_fn(x0[idx].to(device), labels[idx].to(device), Draws(g_noise, batch, shard))
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            total = distributed.mean(total)
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at step {state.step}: lower the learning rate")
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip).item()
            opt.step()
            update_ema(ema, net, ema_decay(cfg, state.step))
            state.step += 1
            if power is not None:
                power.update(net, state.step)  # the power EMA's time: steps taken, 1 after the first
            window.append(total)
            stopping = (stop is not None and stop(state.step)) or signals.requested is not None
            if shard.world > 1:  # a time budget may run out on one rank first: stop together
                stopping = distributed.mean(float(stopping)) > 0
            if log is not None and (state.step % cfg.log_every == 0 or state.step == cfg.steps or stopping):
                elapsed = time.perf_counter() - t_start
                rate = len(window) * batch * cfg.grad_accum / max(elapsed, 1e-9)
                record = {"step": state.step, "loss": sum(window) / len(window), "lr": learning_rate(cfg, state.step)}
                record |= {"grad_norm": grad_norm, "images_per_s": rate}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}")
                window, t_start = [], time.perf_counter()
            if bar is not None:
                bar.update(1)
            ends = state.step == cfg.steps or stopping
            regular = state.step % cfg.save_every == 0 or ends
            # the last step is a snapshot too: a profile is reconstructed at the newest snapshot's step
            snapshot = power is not None and (state.step % cfg.posthoc_snapshot_every == 0 or ends)
            if shard.main and (regular or snapshot):
                save_checkpoint(
                    run,
                    state.step,
                    model=net,
                    ema=ema,
                    optimizer=opt,
                    state=dataclasses.asdict(state) | {"objective": _objective_state(loss_fn)} | power_state,
                    generators={"noise": g_noise},
                    keep=cfg.keep,
                    modules=power.modules if power is not None else None,
                    snapshot=power.snapshot_meta(state.step) if snapshot else None,
                )
                if on_sample is not None and regular:  # not at every snapshot: previews cost samples
                    on_sample(ema, state.step)
            if stopping:
                break
        distributed.barrier()  # rank 0's last checkpoint is on disk when any rank returns
        if signals.requested is not None:
            raise Interrupted(signals.requested, state.step, f"step_{state.step:08d}")
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    return ema


def _check_power_ema(step: Path, cfg: TrainConfig) -> None:
    """Resuming keeps the power EMAs of post-hoc EMA as they were: each is an average from step 0,
    so one cannot be started, dropped or re-widened midway (one line naming both lists)."""
    from unnoise.training.files import read_json

    state = read_json(step / "state.json") if (step / "state.json").is_file() else {}
    saved = state.get("posthoc_ema", []) if isinstance(state, dict) else []  # load_checkpoint judges the rest
    if saved != list(cfg.posthoc_ema):
        raise ValueError(
            f"posthoc_ema must stay as the run began when resuming: {step.name} tracks {saved}, "
            f"the settings ask for {cfg.posthoc_ema}"
        )


def _objective_state(loss_fn: Objective) -> dict:
    """An objective's own state (e.g. the loss-aware sampler's history), if it keeps any."""
    return loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else {}


class _Step(nn.Module):
    """The objective as a module's forward, so that DistributedDataParallel wraps the whole loss."""

    def __init__(self, net: nn.Module, loss_fn: Objective) -> None:
        super().__init__()
        self.net, self.loss_fn = net, loss_fn

    def forward(self, x0: Tensor, labels: Tensor, draws: Draws) -> Tensor:
        return self.loss_fn(self.net, x0, labels, draws)


def _net_config(net: nn.Module) -> dict:
    cfg = getattr(net, "config", None)
    return {"net": dataclasses.asdict(cfg)} if dataclasses.is_dataclass(cfg) else {}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: drawn on a terminal only, so logs and captured stderr hold messages, not bar frames
    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=None)
