"""The training loop: AdamW, warm-up + cosine schedule, clipping, mixed precision, checkpoints that resume exactly.

The loop trains a `Recipe`: an objectives module (the model plus what training adds to it, such as the ITC
temperature; its forward returns named losses), the function that turns samples into a batch, and how the model is
written. BLIP (`blip_recipe`), the two BLIP-2 stages and the BLIP-2 language model (`blip2_stages`, `lm`) all run on
it. Runs in one process, or under `torchrun` with one process per device (DistributedDataParallel; gloo on CPU, nccl
on CUDA). The output directory holds the model in Hub format (rewritten at every checkpoint, so a stopped run is
usable), `checkpoint.pt` (model, optimiser, scheduler, the objectives' own parameters, every process's RNG, and the
step, which fixes the data position because batches are a function of the step) and `train_log.jsonl`. Running the
same command again resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ..blip import Blip
from ..checkpoint import state_dict_for_saving
from ..data.readers import Item, expand_shards
from ..errors import CheckpointError, InputError
from ..processing import ImageProcessor
from .data import Collate, ItemDataset, Sample, ShardStream, StepBatchSampler, stream_batches
from .losses import OBJECTIVES, Objectives

STATE_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
STATE_FORMAT = "blipkit-train-state/1"


@dataclass
class TrainConfig:
    """Options of one training run (defaults suit a small model trained from scratch)."""

    out: Path
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 3e-4
    min_lr_ratio: float = 0.05  # the cosine ends at lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    objectives: tuple[str, ...] = OBJECTIVES
    loss_weights: dict[str, float] = field(default_factory=dict)  # objective -> weight (default 1)
    amp: str = "auto"  # auto (CUDA: bf16 if supported, else fp16), bf16, fp16, off
    grad_checkpointing: bool = False
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    workers: int = 0
    resume: bool = True
    stop_after: int | None = None  # leave after this many steps in this invocation (resumable)
    progress: bool = True
    skip_bad: bool = False
    lm_filter: str | None = None  # regex: captioning learns only from matching captions (when an image has any)


@dataclass
class Recipe:
    """What a run trains and how: the loop itself knows nothing of a model's kind.

    `objectives` holds the model as `.model` plus any parameters training adds (the ITC temperature, BLIP-2's ITG
    head), and `objectives(batch)` returns each loss; `collate` turns `Sample`s into that batch; `processor`
    preprocesses the images (None: text-only samples); `save(directory)` writes the model there in Hub format.
    """

    objectives: nn.Module
    collate: Callable[[list[Sample]], dict[str, Tensor]]
    processor: ImageProcessor | None
    save: Callable[[Path], object]
    unit: str = "img"  # what the throughput counts: "img" (images) or "text"
    find_unused_parameters: bool = False  # DDP: some trainable parameters may get no gradient in a step


@dataclass
class TrainResult:
    """How a `train` call ended."""

    step: int
    losses: dict[str, float]
    seconds: float
    interrupted: bool = False


# --------------------------------------------------------------------------------------------------- setup


def distributed_setup(device: str | torch.device | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device is not None else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if wanted.type == "cuda" and wanted.index is None and world > 1:
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), wanted


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 down to `min_ratio` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases, norms and the temperature (tensors of fewer than 2 dims) get no weight decay."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def autocast_for(device: torch.device, amp: str) -> tuple[object, torch.amp.GradScaler | None]:
    """The autocast context and gradient scaler for `amp` on `device` (CPU: only when asked for, in bf16)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise InputError(f"amp={amp!r}: use auto, bf16, fp16 or off")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext(), None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if device.type != "cuda":
        raise InputError("fp16 mixed precision needs a CUDA device; use --amp bf16 or off")
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def blip_recipe(model: Blip, cfg: TrainConfig) -> Recipe:
    """BLIP: `Objectives` (ITC, ITM, LM, VQA as enabled in `cfg`) on batches of `Collate` with the BLIP tokenizer."""
    from .. import save

    set_grad_checkpointing(model, cfg.grad_checkpointing)
    return Recipe(
        objectives=Objectives(model, cfg.objectives),
        collate=Collate(model.tokenizer, model.config.text_config.max_position_embeddings),
        processor=model.processor,
        save=lambda directory: save(model, directory),
        find_unused_parameters=set(cfg.objectives) != set(OBJECTIVES),
    )


def set_grad_checkpointing(model: Blip, on: bool) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them (less memory, slower)."""
    stacks = [model.vision_model.encoder]
    if model.has("text_encoder"):
        stacks.append(model.text_encoder.encoder)
    if model.has("text_decoder"):
        stacks.append(model.text_decoder.bert.encoder)
    for stack in stacks:
        stack.gradient_checkpointing = on


def batches(data: list[Item] | str, recipe: Recipe, cfg: TrainConfig, start: int, rank: int, world: int) -> Iterator:
    """Collated batches from step `start` on: items (map-style, shuffled per epoch) or tar shards (streamed)."""
    collate, processor = recipe.collate, recipe.processor
    if isinstance(data, str):
        stream = ShardStream(expand_shards(data), processor, cfg.seed, rank, world, skip_bad=cfg.skip_bad,
                             lm_filter=cfg.lm_filter)
        return stream_batches(stream, collate, cfg.batch_size, start)
    sampler = StepBatchSampler(len(data), cfg.batch_size, cfg.seed, start, rank, world)
    loader = torch.utils.data.DataLoader(
        ItemDataset(data, processor, cfg.seed, cfg.lm_filter), batch_sampler=sampler, collate_fn=collate,
        num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
    )
    return iter(loader)


# --------------------------------------------------------------------------------------------------- state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def architecture(model: nn.Module) -> dict:
    """The model's config as a dict (what a resumed run must match): Hub `config.json` when the model has one."""
    cfg = model.config
    return cfg.to_hf() if hasattr(cfg, "to_hf") else dataclasses.asdict(cfg)


def own_parameters(objectives: nn.Module) -> dict[str, Tensor]:
    """Parameters the objectives add to the model (temperature, heads), under canonical names, for the state."""
    return {k: v for k, v in state_dict_for_saving(objectives).items() if not k.startswith("model.")}


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Paths where two config dicts differ, as 'key: saved -> current'."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} in the checkpoint, {b} now")
    return out


def save_state(path: Path, objectives: nn.Module, opt, sched, scaler, step: int, seconds: float,
               cfg: TrainConfig, world: int) -> None:
    """Write the resumable state atomically (every process's RNG is gathered to rank 0)."""
    rng = [_rng_state()]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = {
        "format": STATE_FORMAT,
        "config": architecture(objectives.model),
        "model": state_dict_for_saving(objectives.model),
        "objectives": own_parameters(objectives),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "data_position": step,  # batches are a function of the step (see data.py)
        "seconds": seconds,
        "rng": rng,
        "world_size": world,
        "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, objectives: nn.Module, opt, sched, scaler, rank: int) -> tuple[int, float]:
    """Restore a state written by `save_state` into the live objects; returns (step, seconds so far)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot read the training state ({e}); delete it or use --no-resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a blipkit training state; delete it or use --no-resume")
    diff = _diff(state["config"], architecture(objectives.model))
    if diff:
        raise CheckpointError(
            f"{path}: written by a different architecture ({'; '.join(diff[:3])}); train with the same model "
            f"options, or use another --out (or --no-resume to start over)"
        )
    model = objectives.model
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(state_dict_for_saving(model))
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{path}: parameters do not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    own = state.get("objectives", {"temp": state.get("temp")})  # states of older versions kept only the temperature
    want = own_parameters(objectives)
    if set(own) != set(want):
        raise CheckpointError(f"{path}: training parameters do not match (saved {sorted(own)[:3]}, the run has "
                              f"{sorted(want)[:3]}); use the same stage and objectives, or --no-resume")
    with torch.no_grad():
        for k, v in own.items():
            objectives.get_parameter(k).copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) == 1 or rank < len(rngs):
        _set_rng_state(rngs[min(rank, len(rngs) - 1)])
    return int(state["step"]), float(state.get("seconds", 0.0))


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag checked between steps, so a stopped run saves a consistent checkpoint."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict = {}

    def __enter__(self) -> _StopFlag:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:  # a second signal stops at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------------------- loop


@dataclass
class _Session:
    """What one `train` call runs with: the objectives on their device, optimiser, schedule, precision, and where
    the run starts."""

    recipe: Recipe
    objectives: nn.Module
    runner: nn.Module  # the objectives, wrapped in DistributedDataParallel when there are several processes
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    autocast: object
    scaler: torch.amp.GradScaler | None
    rank: int
    world: int
    device: torch.device
    out: Path
    start: int
    seconds: float


def _session(recipe: Recipe, cfg: TrainConfig, device: str | torch.device | None) -> _Session:
    """Set up a run: processes, output folder, optimiser and schedule, and the state of a run being resumed."""
    rank, world, dev = distributed_setup(device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    objectives = recipe.objectives.to(dev).train()
    opt = make_optimizer(objectives, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    autocast, scaler = autocast_for(dev, cfg.amp)
    torch.manual_seed(cfg.seed + rank)
    start, seconds = 0, 0.0
    if cfg.resume and (out / STATE_FILE).is_file():
        start, seconds = load_state(out / STATE_FILE, objectives, opt, sched, scaler, rank)
    runner: nn.Module = objectives
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            objectives, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=recipe.find_unused_parameters,
        )
    return _Session(recipe, objectives, runner, opt, sched, autocast, scaler, rank, world, dev, out, start, seconds)


def _log_row(run: _Session, step: int, values: dict[str, float], rate: float, seconds: float) -> str:
    """One line of train_log.jsonl."""
    temp = {"temp": run.objectives.temp.item()} if hasattr(run.objectives, "temp") else {}
    row = {"step": step, "lr": run.sched.get_last_lr()[0], **temp, f"{run.recipe.unit}_per_s": round(rate, 1),
           "seconds": round(seconds, 1), **{k: round(v, 4) for k, v in values.items()}}
    return json.dumps(row)


def _all_stop(run: _Session, stopping: bool) -> bool:
    """Whether to stop now: every process must agree to stop at the same step."""
    if run.world == 1:
        return stopping
    flag = torch.tensor([float(stopping)], device=run.device)
    dist.all_reduce(flag)
    return bool(flag.item())


def train(
    model: Blip | Recipe, data: list[Item] | str, cfg: TrainConfig, device: str | torch.device | None = None
) -> TrainResult:
    """Train a BLIP model (or what a `Recipe` describes) in place on `data` (items, or a tar-shard spec) and write
    the model to `cfg.out` in Hub format."""
    run = _session(model if isinstance(model, Recipe) else blip_recipe(model, cfg), cfg, device)
    seconds = run.seconds
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, run.start + cfg.stop_after)
    log = open(run.out / LOG_FILE, "a") if run.rank == 0 else None  # noqa: SIM115 - closed in finally
    bar = tqdm(total=cfg.steps, initial=run.start, desc="train", unit="step",
               disable=run.rank != 0 or not cfg.progress, dynamic_ncols=True)
    running: dict[str, float] = {}
    last: dict[str, float] = {}
    step, interrupted = run.start, False
    try:
        with _StopFlag() as stop:
            it = batches(data, run.recipe, cfg, run.start, run.rank, run.world) if run.start < end else iter(())
            while step < end:
                t0 = time.perf_counter()
                batch = {k: v.to(run.device, non_blocking=True) for k, v in next(it).items()}
                last = _update(run.runner, batch, run.opt, run.sched, run.scaler, run.autocast, cfg.loss_weights,
                               cfg.clip)
                step += 1
                dt = time.perf_counter() - t0
                seconds += dt
                for k, v in last.items():
                    running[k] = 0.9 * running.get(k, v) + 0.1 * v
                rate = len(next(iter(batch.values()))) * run.world / dt  # the first entry has a row per example
                bar.update(1)
                bar.set_postfix({"loss": f"{running['loss']:.3f}", f"{run.recipe.unit}_s": f"{rate:.0f}"})
                if log is not None and (step % cfg.log_every == 0 or step == end):
                    log.write(_log_row(run, step, last, rate, seconds) + "\n")
                    log.flush()
                interrupted = _all_stop(run, stop.set)
                if step % cfg.save_every == 0 or step == end or interrupted:
                    _checkpoint(run.out, run.objectives, run.opt, run.sched, run.scaler, step, seconds, cfg,
                                run.world, run.rank, run.recipe.save)
                if interrupted:
                    break
    finally:
        bar.close()
        if log is not None:
            log.close()
    run.objectives.eval()
    return TrainResult(step, last, seconds, interrupted)


def _update(runner: nn.Module, batch: dict[str, Tensor], opt, sched, scaler, autocast, weights: dict[str, float],
            clip: float) -> dict[str, float]:
    """One optimiser step on `batch`; returns each loss and their weighted sum (`loss`; unlisted weights are 1)."""
    with autocast:
        losses = runner(batch)
    total: Tensor = sum(weights.get(k, 1.0) * v for k, v in losses.items())
    opt.zero_grad(set_to_none=True)
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients
    if clip > 0:
        nn.utils.clip_grad_norm_(runner.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    return {**{k: v.item() for k, v in losses.items()}, "loss": total.item()}


def _checkpoint(out: Path, objectives, opt, sched, scaler, step, seconds, cfg, world, rank, save) -> None:
    save_state(out / STATE_FILE, objectives, opt, sched, scaler, step, seconds, cfg, world)
    if rank == 0:
        save(out)
    if world > 1:
        dist.barrier()
