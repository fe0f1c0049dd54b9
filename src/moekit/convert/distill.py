"""Distil a converted (MoE) student from its dense teacher: layer-wise hidden-state MSE plus an
output loss, the recipe of MoEBERT (Zuo et al. 2022, section 3.3, eq. 5-6: the student matches
the teacher's hidden states in every layer and its predictions).

Shape legend: B batch, L tokens, D d_model, V vocabulary (or classes).

    history = distill(student, teacher, batches, DistillConfig(steps=300, lr=1e-4))

Output losses:
- "embedding": 1 - cos(e_student, e_teacher) of the mean-pooled last hidden states (sentence
  encoders: what sentence-transformers compares; the metric reported in docs/results);
- "logits": KL(teacher || student) of the softmax over the last dimension of `logits`
  (a classifier's classes, a decoder's next-token distribution: Hinton et al. 2015 with T = 1).

Each layer term is the mean squared difference of the block outputs over the real tokens
(padding excluded), averaged over layers; the student's router auxiliary losses are added as
they come (already weighted by their MoEConfig coefficients).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.convert.common import ConversionError, model_kind
from moekit.convert.moebert import as_kwargs, mean_pool
from moekit.layers.moe import apply_router_updates, needs_router_updates

OUTPUT_LOSSES = ("embedding", "logits", "none")


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 1e-4  # AdamW peak learning rate
    warmup_steps: int = 0  # linear warmup, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    hidden_weight: float = 1.0  # weight of the layer-wise hidden-state MSE
    output_weight: float = 1.0  # weight of the output loss
    output: str | None = None  # "embedding", "logits", "none"; None: embedding for encoders, logits for decoders
    dropout: bool = False  # run the student in train mode (dropout on); off fits a teacher faster

    def __post_init__(self):
        for name in ("steps",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DistillConfig.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"DistillConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name, positive in (("lr", True), ("min_lr_ratio", False), ("weight_decay", False), ("grad_clip", False),
                               ("hidden_weight", False), ("output_weight", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    positive and v == 0):
                op = ">" if positive else ">="
                raise ValueError(f"DistillConfig.{name} must be a finite number {op} 0, got {v!r}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"DistillConfig.min_lr_ratio must be <= 1, got {self.min_lr_ratio}")
        if self.output is not None and self.output not in OUTPUT_LOSSES:
            raise ValueError(f"DistillConfig.output must be one of {list(OUTPUT_LOSSES)} or None, got {self.output!r}")
        if not isinstance(self.dropout, bool):
            raise TypeError(f"DistillConfig.dropout must be True or False, got {self.dropout!r}")


class _BlockOutputs:
    """Forward hooks that keep each block's output hidden state (B, L, D)."""

    def __init__(self, model: nn.Module):
        self.states: list[Tensor] = []
        self.active = False  # only distill's own forwards are recorded (not a progress callback's)
        self.handles = [b.register_forward_hook(self._hook) for b in model.blocks]

    def _hook(self, _module, _inputs, output):
        if self.active:
            self.states.append(output[0] if isinstance(output, tuple) else output)

    def run(self, model: nn.Module, kwargs: dict):
        self.active, self.states = True, []
        try:
            out = model(**kwargs)
        finally:
            self.active = False
        return out, self.take()

    def take(self) -> list[Tensor]:
        out, self.states = self.states, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _masked_mse(a_BLD: Tensor, b_BLD: Tensor, mask_BL: Tensor | None) -> Tensor:
    sq_BL = (a_BLD.float() - b_BLD.float()).pow(2).mean(dim=-1)
    if mask_BL is None:
        return sq_BL.mean()
    m = mask_BL.to(sq_BL.dtype)
    return (sq_BL * m).sum() / m.sum().clamp_min(1.0)


def lr_at(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    cfg: DistillConfig | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `student` in place to match `teacher` on `data` (cycled until cfg.steps) and return
    the per-step losses. The teacher is frozen and run in eval mode; both need the same number of
    blocks (a converted model and its source)."""
    cfg = cfg or DistillConfig()
    kind = model_kind(student)
    if model_kind(teacher) != kind or len(teacher.blocks) != len(student.blocks):
        raise ConversionError("distill needs a teacher of the student's kind with the same number of blocks")
    output = cfg.output or ("embedding" if kind == "encoder" else "logits")
    if output == "embedding" and kind != "encoder":
        raise ConversionError("DistillConfig.output='embedding' needs an encoder (mean-pooled hidden states)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train(cfg.dropout)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    s_hooks, t_hooks = _BlockOutputs(student), _BlockOutputs(teacher)
    history: list[dict[str, float]] = []
    # DeepSeek bias balancing with bias_update="manual" wants one update per optimizer step.
    manual = needs_router_updates(student)
    batches = itertools.cycle(data)
    try:
        for step in range(cfg.steps):
            kwargs = as_kwargs(next(batches))
            kwargs.pop("labels", None)
            mask = kwargs.get("attention_mask")
            with torch.no_grad():
                t_out, t_states = t_hooks.run(teacher, kwargs)
            student.train(cfg.dropout)  # a progress callback may have switched it to eval
            s_out, s_states = s_hooks.run(student, kwargs)
            hidden = torch.stack([_masked_mse(s, t, mask) for s, t in zip(s_states, t_states)]).mean()
            if output == "embedding":
                e_s = mean_pool(s_out.hidden_states.float(), mask)
                e_t = mean_pool(t_out.hidden_states.float(), mask)
                out_loss = (1 - F.cosine_similarity(e_s, e_t, dim=-1)).mean()
            elif output == "logits":
                out_loss = F.kl_div(F.log_softmax(s_out.logits.float(), -1), F.log_softmax(t_out.logits.float(), -1),
                                    log_target=True, reduction="none").sum(-1).mean()
            else:
                out_loss = hidden.new_zeros(())
            aux = s_out.aux_loss.float()
            loss = cfg.hidden_weight * hidden + cfg.output_weight * out_loss + aux
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill: non-finite loss at step {step + 1}")
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if manual:
                apply_router_updates(student)
            rec = {"step": step + 1, "loss": loss.item(), "hidden_mse": hidden.item(), "output": out_loss.item(),
                   "aux": aux.item(), "lr": opt.param_groups[0]["lr"]}
            history.append(rec)
            if progress is not None:
                progress(step + 1, rec)
    finally:
        s_hooks.close()
        t_hooks.close()
        student.eval()
    return history
