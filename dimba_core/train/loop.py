"""The training loop: set a run up, take its steps (LoRA or full, DDP or FSDP), save checkpoints and weights."""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .batches import Batches, prepare_cache
from .files import LOG_FILE, check_paths, clear_previous_run, make_out, step_path, trim_log
from .model import (Trainee, attach_lora, check_cache_fits, check_model_fits, enable_checkpointing,
                    load_for_training, make_optimizer, pick_scan_backend, warmup_schedule, wrap)
from .objective import training_losses
from .options import PRECISIONS, TrainOptions, micro_batch
from .parallel import barrier, close_distributed, init_distributed, whole
from .state import (TrainingDiverged, _check_finite, _last_good, check_resume_fits, gather, gather_ema,
                    gather_model, gather_trained, load_checkpoint, restore_progress, restore_state, save_checkpoint,
                    trained_shapes, write_outputs)

# also imported from here by the tests and benchmarks (with TrainOptions, PRECISIONS, check_paths, prepare_cache,
# write_outputs, enable_checkpointing, make_optimizer, pick_scan_backend, TrainingDiverged, _check_finite)
from .batches import seed_for  # noqa: F401
from .state import _check_fits  # noqa: F401

MAX_NONFINITE_STEPS = 3  # non-finite steps in a row (each skipped) after which the run stops


def train(opts: TrainOptions) -> dict:
    """Run a training job; returns {"weights": path, "ema": path?, "losses": [...], "step_seconds": [...]}."""
    check_paths(opts)  # every process, before any of them writes
    rank, world, device = init_distributed(opts.device)
    try:
        micro = micro_batch(opts, world)
        resumed = load_checkpoint(opts) if opts.resume else None
        if rank == 0:
            make_out(opts)
        model = load_for_training(opts, device)
        image_size = check_model_fits(opts, model)
        if resumed is not None:
            check_resume_fits(*resumed, trained_shapes(opts, model), opts)
        barrier(world)  # rank 0 made --out
        cache = prepare_cache(opts, rank, world, device, image_size, model.config)
        check_cache_fits(opts, cache, model.config, image_size)
        return _run(opts, model, cache, rank, world, device, micro, resumed)
    finally:
        close_distributed(world)


@dataclass
class Run:
    """One process's share of a run: its options, what it trains, the optimizer's parts and where it runs."""

    opts: TrainOptions
    model: torch.nn.Module
    lora: torch.nn.Module | None
    net: torch.nn.Module  # what the forward pass goes through: the Trainee, or DDP around it
    names: list
    params: list  # the trained tensors (DTensors under FSDP), in the order of names
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: dict | None
    rank: int
    world: int
    device: torch.device
    micro: int  # samples per process and accumulation step


def _run(opts, model, cache, rank, world, device, micro, resumed=None) -> dict:
    """Train the loaded model on the cache from step 0 (or the resumed step); the outputs, losses, step times."""
    backend = pick_scan_backend(model, device)
    run = setup(opts, model, rank, world, device, micro)
    start = resume(run, *resumed) if resumed is not None else 0
    batches = Batches(cache, opts.seed, opts.batch_size, opts.class_dropout_prob)
    null_caption = model.y_embedder.y_embedding.detach().float().cpu()  # a buffer: fixed during training
    out = Path(opts.out)
    prepare_out(run, resumed is not None, start)
    losses, step_seconds = [], []
    bad_steps = []  # the non-finite steps in a row up to now
    with step_log(run, start, backend) as (log, bar):
        for step in range(start, opts.steps):
            t0 = time.perf_counter()
            total = accumulate(run, batches, step, null_caption)
            if step == start:
                check_gradients(run, backend)
            total, grad_norm, finite, lr = update(run, total)
            step_seconds.append(time.perf_counter() - t0)
            losses.append(total[0] if finite else math.nan)
            done = step + 1
            bad_steps = [] if finite else bad_steps + [done]
            if rank == 0:
                log_step(log, bar, done, total, grad_norm, finite, lr, step_seconds[-1])
            if len(bad_steps) >= MAX_NONFINITE_STEPS:
                raise diverged(bad_steps, run.scheduler.get_last_lr()[0], out)
            if (opts.save_every and done % opts.save_every == 0) or done == opts.steps:
                save(run, done, out)
    return dict(finish(run, out), losses=losses, step_seconds=step_seconds, scan_backend=backend)


# --- setup ------------------------------------------------------------------------------------------------

def setup(opts: TrainOptions, model, rank: int, world: int, device, micro: int) -> Run:
    """LoRA (or every weight) trainable, blocks recomputed if asked, DDP/FSDP; optimizer, warm-up, scaler, EMA."""
    lora = attach_lora(opts, model, device, rank)
    if opts.grad_checkpointing:
        enable_checkpointing(model)
    trainee = Trainee(model, lora)
    net = wrap(trainee, opts, world, device)
    trained = [(n, p) for n, p in trainee.named_parameters() if p.requires_grad]  # after FSDP: its DTensors
    names, params = [n for n, _ in trained], [p for _, p in trained]
    optimizer = make_optimizer(opts.optimizer, params, opts.learning_rate, opts.weight_decay)
    scheduler = warmup_schedule(optimizer, opts.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=PRECISIONS[opts.precision] is torch.float16)
    ema = {n: p.detach().clone() for n, p in zip(names, params)} if opts.ema_decay else None
    return Run(opts, model, lora, net, names, params, optimizer, scheduler, scaler, ema, rank, world, device, micro)


def resume(run: Run, path: Path, state: dict) -> int:
    """Continue from a checkpoint (weights, optimizer, schedule, scaler, EMA, random state); returns its step."""
    restore_state(run.model, run.lora, run.optimizer, state, run.opts.fsdp, path)
    run.ema = restore_progress(state, run.scheduler, run.scaler, run.ema, run.names, run.params, path)
    start = state["step"]
    if run.opts.lr is not None:
        set_lr(run, run.opts.lr, path, start)
    return start


def set_lr(run: Run, lr: float, path: Path, start: int) -> None:
    """A --lr given on resuming replaces the run's own from this step on (the warm-up continues)."""
    scheduler, was = run.scheduler, run.scheduler.base_lrs[0]
    if lr == was:
        return
    scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in run.optimizer.param_groups:
        group["initial_lr"], group["lr"] = lr, lr * factor
    scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    if run.rank == 0:
        warnings.warn(f"--lr {lr:g} replaces the lr {was:g} of the run that wrote {path.name} from step {start} on",
                      stacklevel=5)


def prepare_out(run: Run, resumed: bool, start: int) -> None:
    """Rank 0 clears an old run (--overwrite) or drops the log records after the resumed step; all then wait."""
    if run.rank == 0:
        if run.opts.overwrite:
            clear_previous_run(run.opts)
        elif resumed:
            trim_log(Path(run.opts.out), start)
    barrier(run.world)


@contextlib.contextmanager
def step_log(run: Run, start: int, backend: str):
    """(log.jsonl opened to append, progress bar or None) on rank 0, (None, None) elsewhere; closed at the end."""
    log = (Path(run.opts.out) / LOG_FILE).open("a") if run.rank == 0 else None
    bar = None
    try:
        if run.rank == 0 and run.opts.progress:
            from tqdm import tqdm

            kind = "LoRA" if run.lora is not None else "full"
            bar = tqdm(total=run.opts.steps, initial=start, desc=f"train ({kind}, {backend} scan)", unit="step")
        yield log, bar
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()


# --- a step -----------------------------------------------------------------------------------------------

def accumulate(run: Run, batches: Batches, step: int, null_caption: torch.Tensor) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of `step`; the summed (loss, mse, vb) terms."""
    opts, device = run.opts, run.device
    amp_dtype = PRECISIONS[opts.precision]
    per_step = opts.batch_size // opts.grad_accum
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for a in range(opts.grad_accum):
        first = a * per_step + run.rank * run.micro
        x0, t, y, mask, noise = batches.batch(step, range(first, first + run.micro), null_caption, device)
        sync = a == opts.grad_accum - 1
        if opts.fsdp:
            run.model.set_requires_gradient_sync(sync)
        ctx = run.net.no_sync() if not sync and run.world > 1 and not opts.fsdp else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            terms = training_losses(run.net, x0, t, y, mask, noise)
            loss = terms["loss"].sum() * (run.world / opts.batch_size)
        run.scaler.scale(loss).backward()
        total += torch.stack([terms[k].detach().double().sum() for k in ("loss", "mse", "vb")])
    return total


def check_gradients(run: Run, backend: str) -> None:
    """After the first backward pass: every trained tensor got a gradient."""
    unused = [n for n, p in zip(run.names, run.params) if p.grad is None]
    if unused:
        raise RuntimeError(f"{len(unused)} trainable tensors got no gradient ({', '.join(unused[:3])}): "
                           f"the {backend} scan path bypasses them; train with another scan backend")


def update(run: Run, total: torch.Tensor) -> tuple[list, float, bool, float]:
    """Average the loss terms over processes, clip, step the optimizer (unless the step is non-finite), the
    schedule and the EMA. Returns (loss, mse, vb), the gradient norm, whether it stepped, and the lr it used."""
    opts = run.opts
    if run.world > 1:
        dist.all_reduce(total)
    total = (total / opts.batch_size).tolist()
    run.scaler.unscale_(run.optimizer)
    clip = opts.max_grad_norm if opts.max_grad_norm > 0 else math.inf
    grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(run.params, clip)))
    # the loss terms (the objective zeroes a NaN loss, not mse/vb) and, unless fp16's scaler skips
    # overflowing steps itself, the gradient: a non-finite step is skipped, several in a row stop the run
    finite = all(map(math.isfinite, total)) and (run.scaler.is_enabled() or math.isfinite(grad_norm))
    lr = run.scheduler.get_last_lr()[0]  # this step's; scheduler.step() below sets the next step's
    if finite:
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None and finite:
        update_ema(run.ema, run.names, run.params, opts.ema_decay)
    return total, grad_norm, finite, lr


@torch.no_grad()
def update_ema(ema: dict, names, params, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for each trained tensor."""
    for n, p in zip(names, params):
        ema[n].lerp_(p.detach(), 1 - decay)


def log_step(log, bar, done: int, total: list, grad_norm: float, finite: bool, lr: float, seconds: float) -> None:
    """Rank 0: one log.jsonl record (a skipped step with a warning), and the progress bar."""
    clean = [v if math.isfinite(v) else None for v in (*total, grad_norm)]
    record = dict(step=done, loss=clean[0] if finite else None, mse=clean[1], vb=clean[2], lr=lr,
                  grad_norm=clean[3], seconds=seconds)
    log.write(json.dumps(record if finite else dict(record, skipped=True)) + "\n")
    log.flush()
    if not finite:
        warnings.warn(f"step {done}: the loss or gradient is NaN or infinite; the step is skipped (no weight "
                      "update)", stacklevel=4)
    if bar is not None:
        bar.set_postfix(loss=f"{total[0]:.4f}", lr=f"{lr:.2e}")
        bar.update(1)


def diverged(bad_steps: list, lr: float, out: Path) -> TrainingDiverged:
    """The error that stops a run after MAX_NONFINITE_STEPS non-finite steps in a row."""
    return TrainingDiverged(
        f"training diverged: the loss was NaN or infinite in {len(bad_steps)} steps in a row (steps "
        f"{bad_steps[0]}-{bad_steps[-1]}, skipped); lower the learning rate (it is {lr:g}), keep --max-grad-norm "
        f"on, or train in --precision fp32/bf16. {_last_good(out)}")


# --- saves ------------------------------------------------------------------------------------------------

def save(run: Run, done: int, out: Path) -> None:
    """The resumable checkpoint after `done` steps, refused if a weight is non-finite; every rank joins."""
    _check_finite(run.params, run.ema, run.device, run.world, out, done)
    trained, optim_state = gather_trained(run.model, run.lora, run.optimizer, run.opts.fsdp, run.rank)
    ema = None if run.ema is None else gather(run.ema, run.rank)
    if run.rank == 0:
        save_checkpoint(step_path(out, done), done, run.opts, trained, optim_state, run.scheduler, run.scaler, ema)
    barrier(run.world)


def finish(run: Run, out: Path) -> dict:
    """The trained weights (and EMA) written out, refused if non-finite; {"weights": path, "ema": path?} on rank 0."""
    _check_finite(run.params, run.ema, run.device, run.world, out, run.opts.steps)
    model_sd = gather_model(run.model, run.opts.fsdp, run.rank) if run.lora is None else {}
    paths = write_outputs(run.opts, run.model, run.lora, gather_ema(run.ema, run.lora, run.rank), run.rank, model_sd)
    barrier(run.world)
    return paths
