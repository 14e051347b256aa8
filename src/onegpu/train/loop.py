"""The training loop: loss on reply tokens, AdamW, warm-up + cosine, accumulation, checkpoints.

A small loop of our own rather than transformers' Trainer: it has to pass restarting position ids
for packing, compute the head only where there are labels, and resume exactly; each is a few
lines here and a subclass there.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from onegpu.files import staged
from onegpu.train.batching import Batch
from onegpu.train.format import IGNORE_INDEX
from onegpu.train.model import base_of, load_adapter_weights, save_adapter, trainable_parameters

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")


@dataclass(frozen=True)
class LoopConfig:
    """Optimization settings (from `TrainSettings`, which holds their defaults); `steps` counts
    optimizer steps."""

    steps: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None
    optimizer: str
    neftune_alpha: float | None
    eval_every: int | None
    save_every: int | None
    keep_checkpoints: int
    seed: int
    loss_chunk: int = 1024  # reply tokens per slice of the output head


@dataclass
class History:
    """What the run record keeps of a loop: losses and timings, by optimizer step."""

    train: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr, seconds, tokens
    eval: list[dict[str, float]] = field(default_factory=list)  # step, loss, tokens
    optimizer: str = ""
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- pure pieces --------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over `warmup_steps`, then a cosine from 1 down to `min_ratio`
    at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def neftune_noise(embeds: torch.Tensor, alpha: float, generator=None) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise in +-alpha / sqrt(T * d) on [B, T, d] embeds."""
    scale = alpha / math.sqrt(embeds.shape[-2] * embeds.shape[-1])
    noise = torch.rand(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    return embeds + (noise * 2 - 1) * scale


def add_neftune(model, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Add NEFTune noise to the input embeddings while the model trains (not in eval)."""
    embeddings = base_of(model).get_input_embeddings()

    def hook(module, inputs, output):
        return neftune_noise(output, alpha) if module.training else output

    return embeddings.register_forward_hook(hook)


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [N, V]
    return F.cross_entropy(logits, targets, reduction="sum")


def loss_sum(model, batch: Batch, *, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's reply tokens, and how many there are.

    The decoder runs once; the output head runs only on positions whose next token is learned,
    `chunk` at a time under activation checkpointing, so [T, vocab] logits are never all alive
    (at 2,048 tokens and Qwen's 152k vocabulary they would take 1.2 GB in fp32, and as much again
    for their gradient).
    """
    base = base_of(model)
    out = base.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    )
    hidden = out.last_hidden_state[:, :-1]  # [B, T-1, H]: position t predicts token t+1
    targets = batch.labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]  # [N, H], [N]
    head = base.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _ce_sum(head, h, t)
    return total, int(targets.numel())


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], device: torch.device, *, chunk: int = 1024) -> float:
    """Mean cross-entropy per reply token over `batches` (dropout and NEFTune off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_sum(model, batch.to(device), chunk=chunk)
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def make_optimizer(params, cfg: LoopConfig, device: torch.device):
    """AdamW: bitsandbytes' paged 8-bit one on CUDA when available (or asked for), else torch's."""
    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}")
    if name in ("auto", "paged_adamw_8bit") and device.type == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            if name == "paged_adamw_8bit":
                msg = "paged_adamw_8bit needs bitsandbytes: pip install 'onegpu[train]'"
                raise ValueError(msg) from exc
        else:
            opt = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            return opt, "paged_adamw_8bit"
    elif name == "paged_adamw_8bit":
        raise ValueError("paged_adamw_8bit needs a CUDA GPU (bitsandbytes); use adamw")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "adamw"


# -- checkpoints --------------------------------------------------------------------------------


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint under `output/checkpoints`, if any."""
    folder = Path(output) / CHECKPOINTS
    done = (
        [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    )
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(model, optimizer, step: int, history: History, output: Path, keep: int):
    folder = Path(output) / CHECKPOINTS
    final = folder / f"step-{step:06d}"
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "history": history.to_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    # Hidden while written: resuming looks for step-* folders.
    with staged(final, partial=folder / f".step-{step:06d}.partial") as partial:
        save_adapter(model, partial)
        torch.save(state, partial / STATE_FILE)
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved: %s", final)


def _load_checkpoint(model, optimizer, path: Path) -> tuple[int, History]:
    load_adapter_weights(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    history = History(**state["history"])
    return state["step"], history


# -- the loop -----------------------------------------------------------------------------------


def micro_batches(epoch_batches: Callable[[int], list[Batch]], start: int) -> Iterator[Batch]:
    """Micro-batches epoch after epoch (each epoch in its own order), skipping the first `start`."""
    epoch, skipped = 0, 0
    while True:
        batches = epoch_batches(epoch)
        if not batches:
            raise ValueError("no training batches")
        if skipped + len(batches) <= start:
            skipped += len(batches)
        else:
            yield from batches[max(start - skipped, 0) :]
            skipped = start
        epoch += 1


def _set_lr(optimizer, step: int, cfg: LoopConfig) -> float:
    """The schedule's learning rate for `step`, set on every parameter group."""
    lr = cfg.lr * lr_factor(
        step, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _optimizer_step(model, group: list[Batch], params, optimizer, cfg: LoopConfig, device):
    """Accumulate the gradients of `group`'s micro-batches, clip, step: (mean loss, targets)."""
    n_total = sum(b.n_targets for b in group)
    loss_total = 0.0
    for batch in group:
        s, n = loss_sum(model, batch.to(device), chunk=cfg.loss_chunk)
        if n:  # mean over all reply tokens of the accumulated batches, not of means
            (s / n_total).backward()
            loss_total += float(s.detach())
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total / max(n_total, 1), n_total


def fit(
    model,
    epoch_batches: Callable[[int], list[Batch]],
    eval_batches: Sequence[Batch],
    cfg: LoopConfig,
    *,
    device: torch.device,
    output: Path,
    resume: bool = False,
    progress: bool = True,
) -> History:
    """Train the model's trainable (LoRA) weights for `cfg.steps` optimizer steps.

    `epoch_batches(e)` gives epoch e's micro-batches (a deterministic function of e, so that a
    resumed run sees the same data in the same order). Every `save_every` steps a checkpoint goes
    to `output/checkpoints/step-N`; with `resume`, the newest one is loaded and training goes on
    from there. Eval loss is measured before the first step, every `eval_every` steps and at the
    end.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer, opt_name = make_optimizer(params, cfg, device)
    history = History(optimizer=opt_name)
    start = 0
    checkpoint_dir = latest_checkpoint(output) if resume else None
    if checkpoint_dir is not None:
        start, history = _load_checkpoint(model, optimizer, checkpoint_dir)
        history.resumed_from = start
        log.warning("resuming from %s (step %d of %d)", checkpoint_dir, start, cfg.steps)
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def run_eval(step: int) -> None:
        if eval_batches:
            loss = evaluate(model, eval_batches, device, chunk=cfg.loss_chunk)
            tokens = sum(b.n_targets for b in eval_batches)
            history.eval.append({"step": step, "loss": loss, "tokens": tokens})
            log.info("eval loss at step %d: %.4f", step, loss)

    hook = add_neftune(model, cfg.neftune_alpha) if cfg.neftune_alpha else None
    model.train()
    if start == 0:
        run_eval(0)
    stream = micro_batches(epoch_batches, start * cfg.grad_accum)
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step", disable=not progress)
    try:
        for step in range(start, cfg.steps):
            started = time.perf_counter()
            lr = _set_lr(optimizer, step, cfg)
            group = [next(stream) for _ in range(cfg.grad_accum)]
            loss, n_total = _optimizer_step(model, group, params, optimizer, cfg, device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step + 1}")
            done = step + 1
            history.train.append(
                {
                    "step": done,
                    "loss": loss,
                    "lr": lr,
                    "seconds": time.perf_counter() - started,
                    "tokens": sum(b.n_tokens for b in group),
                    "targets": n_total,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                run_eval(done)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                _save_checkpoint(model, optimizer, done, history, output, cfg.keep_checkpoints)
        if not history.eval or history.eval[-1]["step"] != cfg.steps:
            run_eval(cfg.steps)
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    model.eval()
    return history
