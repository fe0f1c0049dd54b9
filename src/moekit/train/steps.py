"""The pieces of a training step and of evaluation: the learning-rate schedule, AdamW's parameter
groups, device and precision, the LM loss, and the validation pass. `loop.py` runs them.

Shape legend: B sequences per micro-batch, L tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.train.config import RunConfig
from moekit.train.data import bits_per_byte


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    s, peak = cfg.schedule, cfg.optim.lr
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    decay_steps = max(1, s.steps - s.warmup_steps - 1)  # the last step runs at exactly min_lr
    progress = min(1.0, (step - s.warmup_steps) / decay_steps)
    floor = peak * s.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); decay on matrices only, as in GPT-2/nanoGPT: norms and
    biases are scale parameters that decay would only push toward zero."""
    o = cfg.optim
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but no CUDA device is available; use device=cpu or auto")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.precision == "fp32":
        return False
    if cfg.precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("run.precision=bf16 but this CUDA device does not support bfloat16")
        return True
    # auto: bf16 where the hardware has it natively; CPU stays in fp32 (exact and resumable).
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# A target that is not trained (a fine-tuning prompt, padding): cross_entropy's ignore_index.
IGNORE = -100


def lm_loss_sum(logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
    """Summed next-token cross-entropy in nats (targets are already shifted by the data); targets
    equal to IGNORE add nothing."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten(), reduction="sum",
                           ignore_index=IGNORE)


def scored(targets_BL: Tensor, token_bytes: Tensor) -> tuple[int, int]:
    """(targets scored, bytes of text they cover): targets equal to IGNORE count for neither
    (indexing token_bytes with -100 would silently read another token's entry)."""
    kept = targets_BL[targets_BL != IGNORE].cpu()
    return kept.numel(), int(token_bytes[kept].sum())


def micro_lm_loss(logits_BLV: Tensor, targets_BL: Tensor, count: int, total: int, accum: int) -> Tensor:
    """One micro-batch's share of a step's LM loss, times `accum` (the loop divides by it): the
    step's loss is the mean over its `total` trained targets, so each micro-batch's mean over its
    `count` is weighted by count * accum / total, exactly 1.0 when no target is masked (LM
    training's numbers stay bit for bit what they were)."""
    return lm_loss_sum(logits_BLV, targets_BL) / max(count, 1) * (count * accum / max(total, 1))


def trained_counts(targets: list[Tensor]) -> tuple[list[int], int]:
    """The trained targets (not IGNORE) of each micro-batch of a step, and their total."""
    counts = [int((y != IGNORE).sum()) for y in targets]
    return counts, sum(counts)


@torch.no_grad()
def evaluate(model: nn.Module, batches, token_bytes: Tensor, device: torch.device, ctx) -> tuple[float, float]:
    """(mean nats per scored token, bits per byte) over fixed validation batches (targets equal to
    IGNORE are not scored)."""
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    try:
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
            for x_BL, y_BL in batches:
                x_BL, y_BL = x_BL.to(device), y_BL.to(device)
                with ctx:
                    out = model(x_BL)
                nats += float(lm_loss_sum(out.logits, y_BL))
                n, b = scored(y_BL, token_bytes)
                tokens, nbytes = tokens + n, nbytes + b
    finally:
        model.train(was_training)
    return nats / max(tokens, 1), bits_per_byte(nats, nbytes)
