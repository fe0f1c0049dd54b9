"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, evaluation,
checkpoints, non-finite detection. Importable so a test can run one step.

Shape legend: B sequences per micro-batch, L tokens per sequence, V vocabulary.

    result = train(run_config, out_dir)              # fresh run
    result = train(run_config, out_dir, resume=True) # continue from the newest checkpoint

Determinism: the model is built right after `torch.manual_seed(seed)`, batches are a pure function
of the step (see data.py), and checkpoints carry the RNG states, so on CPU a run resumed at step
N/2 reproduces the uninterrupted run's losses bit for bit.

Under `torchrun` (WORLD_SIZE > 1) the model is handed to `moekit.parallel` and each rank reads its
own interleaved slice of every global batch; only rank 0 writes logs, metadata and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.moe import MoE, apply_router_updates
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig, diff_dicts, to_dict
from moekit.train.data import LMData, bits_per_byte
from moekit.train.distributed import setup_distributed
from moekit.train.metrics import JsonlLog, LayerStats, Progress, TensorBoardLog
from moekit.train.nonfinite import NonFiniteError, nonfinite_message

# Resuming with a different value of these would not continue the same run.
RESUME_MUST_MATCH = ("model", "data", "seed", "optim.grad_accum")


@dataclass
class TrainResult:
    out_dir: Path
    label: str
    steps: int
    tokens: int
    train_time: float  # seconds in training steps (evals and checkpoints excluded)
    cpu_time: float  # process CPU seconds in those steps (all threads): steadier than wall-clock on a busy machine
    params_total: int
    params_active: int
    losses: list[float] = field(default_factory=list)  # per optimizer step run in this call
    evals: list[dict] = field(default_factory=list)
    final_val_bpb: float | None = None


# ----------------------------------------------------------------------------- pieces


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


def lm_loss_sum(logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
    """Summed next-token cross-entropy in nats (targets are already shifted by the data)."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten(), reduction="sum")


def needs_manual_router_updates(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, MoE) and m.cfg.router == "sigmoid_bias" and m.cfg.router_options.bias_update == "manual":
            return True
    return False


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, batches, token_bytes: Tensor, device: torch.device, ctx) -> tuple[float, float]:
    """(mean nats per token, bits per byte) over fixed validation batches."""
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
                tokens += y_BL.numel()
                nbytes += int(token_bytes[y_BL.cpu()].sum())
    finally:
        model.train(was_training)
    return nats / max(tokens, 1), bits_per_byte(nats, nbytes)


# ----------------------------------------------------------------------------- the run


def _model_config_dict(model_cfg) -> dict:
    try:
        from moekit.models import config_to_dict

        return config_to_dict(model_cfg)
    except (ImportError, TypeError):  # a stand-in model outside the registry (tests)
        return to_dict(model_cfg)


def _default_model_factory(model_cfg) -> nn.Module:
    from moekit.models import build_model

    return build_model(model_cfg)


def _count(model: nn.Module) -> tuple[int, int]:
    try:
        from moekit.models import count_parameters

        return count_parameters(model)
    except ImportError:
        total = sum(p.numel() for p in model.parameters())
        return total, total


def _machine() -> dict:
    from moekit.machine import cpu_name

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _check_resume_config(saved: dict, current: dict) -> list[str]:
    diffs = diff_dicts(saved, current)
    fatal = [d for d in diffs if any(d == k or d.startswith(k + ".") for k in RESUME_MUST_MATCH)]
    if fatal:
        raise ValueError(
            f"--resume: the checkpoint was trained with different {', '.join(fatal[:8])}; "
            f"resuming would not continue the same run (use the same preset and --set values)"
        )
    return diffs


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: LMData | None = None,
    label: str | None = None,
    console=None,
    model_factory: Callable[[object], nn.Module] | None = None,
    before_step: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `cfg.model` on `cfg.data` and write logs and checkpoints under `out_dir`.

    `data` lets several runs share one loaded corpus (compare); `before_step(step, model)` is a
    test seam (fault injection) called before each optimizer step.
    """
    out = Path(out_dir)
    label = label or cfg.name
    ck_root = out / "checkpoints"
    device = resolve_device(cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, label, ck_root, device, resume, overwrite, data, console, model_factory, before_step)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg, out, label, ck_root, device, resume, overwrite, data, console, model_factory, before_step):
    bf16 = use_bf16(cfg, device)
    ctx = autocast(device, bf16)

    existing = ckpt.list_checkpoints(ck_root)
    if existing and not resume and not overwrite:
        raise ValueError(
            f"{ck_root} already holds checkpoints (newest step {existing[-1][0]}); pass --resume to "
            f"continue that run, or choose another --out"
        )
    resume_from = None
    if resume:
        ckpt.remove_partial(ck_root)
        resume_from = ckpt.latest(ck_root)  # raises CheckpointError naming the bad file
        if resume_from is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ck_root}; run without --resume to start fresh")
    elif overwrite and existing:
        for _, p in existing:
            import shutil

            shutil.rmtree(p)

    if data is None:
        data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache")
    model_cfg = cfg.model
    if hasattr(model_cfg, "vocab_size") and model_cfg.vocab_size != data.tokenizer.vocab_size:
        # The tokenizer decides the vocabulary; keep the config honest about it.
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if hasattr(model_cfg, "max_seq_len") and model_cfg.max_seq_len < cfg.data.seq_len:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len}); "
            f"raise model.max_seq_len or shorten data.seq_len"
        )
    run_dict = to_dict(cfg)
    run_dict["model"] = _model_config_dict(model_cfg)

    torch.manual_seed(cfg.seed)
    factory = model_factory or _default_model_factory
    base_model = factory(model_cfg).to(device)
    base_model.train()
    optimizer = build_optimizer(base_model, cfg)
    params_total, params_active = _count(base_model)

    start_step, train_time, cpu_time, resume_diffs = 0, 0.0, 0.0, []
    if resume_from is not None:
        saved_cfg = json.loads((resume_from.path / "run_config.json").read_text())
        resume_diffs = _check_resume_config(saved_cfg, run_dict)
        ckpt.load_training_state(resume_from, base_model, optimizer)
        start_step = resume_from.step
        train_time = float(resume_from.manifest.get("train_time", 0.0))
        cpu_time = float(resume_from.manifest.get("cpu_time", 0.0))
    model, dist = setup_distributed(base_model, cfg, device, optimizer)
    run_model = torch.compile(model) if cfg.compile else model
    manual_updates = needs_manual_router_updates(base_model)

    steps, accum = cfg.schedule.steps, cfg.optim.grad_accum
    tokens_per_step = cfg.tokens_per_step * dist.data_world
    val_batches = data.val_batches(cfg.eval.batches)

    main = dist.is_main
    log = tb = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(out)
        meta = {
            "label": label,
            "config": run_dict,
            "data": data.info,
            "params": {"total": params_total, "active": params_active},
            "device": str(device),
            "precision": "bf16" if bf16 else "fp32",
            "machine": _machine(),
            "command": sys.argv,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "resumed_from_step": start_step if resume_from else None,
        }
        (out / "run.json").write_text(json.dumps(meta, indent=2))
        log = JsonlLog(out / "metrics.jsonl", truncate_after_step=start_step if resume_from else None)
        tb = TensorBoardLog(out / "tensorboard", cfg.logging.tensorboard)
        if resume_from is not None:
            msg = f"resumed from {resume_from.path}"
            if resume_diffs:
                msg += f" (changed: {', '.join(resume_diffs[:8])})"
            log.write({"kind": "event", "step": start_step, "message": msg})
    progress = Progress(steps, start_step, label, enabled=main and cfg.logging.progress, console=console)

    result = TrainResult(out, label, start_step, start_step * tokens_per_step, train_time, cpu_time, params_total,
                         params_active)
    stats = LayerStats()
    interval = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "n": 0, "time": 0.0, "gn": 0.0}
    wall_start = time.perf_counter() - train_time
    last_saved = start_step if resume_from else -1

    def save(step_done: int) -> None:
        nonlocal last_saved
        if step_done == last_saved:
            return
        # Under EP every rank takes part in gathering the full model; only the main rank writes.
        with dist.full_model(base_model, optimizer):
            if main:
                ckpt.save_checkpoint(
                    ck_root, step_done, base_model, optimizer,
                    model_config=run_dict["model"], run_config=run_dict, tokenizer=data.tokenizer,
                    extra={"train_time": result.train_time, "cpu_time": result.cpu_time, "tokens": result.tokens,
                           "label": label},
                    keep_last=cfg.checkpoint.keep_last,
                )
        last_saved = step_done

    def run_eval(step_done: int) -> None:
        # Every rank evaluates (the EP forward is collective); only the main rank records it.
        val_loss, val_bpb = evaluate(run_model, val_batches, data.token_bytes, device, ctx)
        if not main:
            return
        rec = {"kind": "eval", "step": step_done, "tokens": result.tokens, "time": result.train_time,
               "cpu_time": result.cpu_time,
               "elapsed": time.perf_counter() - wall_start, "val_loss": val_loss, "val_bpb": val_bpb}
        result.evals.append(rec)
        result.final_val_bpb = val_bpb
        log.write(rec)
        tb.eval(rec)
        progress.update(step_done, val_bpb=val_bpb)

    try:
        if start_step == 0 and cfg.eval.every > 0:
            run_eval(0)
        for step in range(start_step, steps):
            if before_step is not None:
                before_step(step, base_model)
            t0, c0 = time.perf_counter(), time.process_time()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses, lms, auxes = [], [], []
            x_BL = None
            for micro in range(accum):
                x_BL, y_BL = data.train_batch(step, micro, accum, dist.data_rank, dist.data_world)
                x_BL, y_BL = x_BL.to(device), y_BL.to(device)
                with ctx:
                    out_ = run_model(x_BL)
                lm = lm_loss_sum(out_.logits, y_BL) / y_BL.numel()
                loss = lm + out_.aux_loss.float()
                (loss / accum).backward()
                losses.append(loss.detach())
                lms.append(lm.detach())
                auxes.append(out_.aux_loss.detach().float())
                stats.add(out_.layer_metrics)
            step_loss = dist.mean(torch.stack(losses).mean())
            if not torch.isfinite(step_loss):
                raise NonFiniteError(nonfinite_message("loss", step + 1, base_model, x_BL, ctx))
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = dist.clip_grad_norm_(base_model, clip)
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(nonfinite_message("gradient", step + 1, base_model, None, ctx))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if manual_updates:
                apply_router_updates(base_model)
            dt = time.perf_counter() - t0
            result.cpu_time += time.process_time() - c0
            step_done = step + 1
            result.train_time += dt
            result.tokens += tokens_per_step
            result.steps = step_done
            loss_value = float(step_loss)
            result.losses.append(loss_value)
            interval["loss"] += loss_value
            interval["lm"] += float(torch.stack(lms).mean())
            interval["aux"] += float(torch.stack(auxes).mean())
            interval["gn"] += float(grad_norm)
            interval["n"] += 1
            interval["time"] += dt

            if main and (step_done % cfg.logging.every == 0 or step_done == steps):
                n = interval["n"]
                rec = {
                    "kind": "train", "step": step_done, "tokens": result.tokens, "time": result.train_time,
                    "cpu_time": result.cpu_time,
                    "elapsed": time.perf_counter() - wall_start,
                    "loss": interval["loss"] / n, "lm_loss": interval["lm"] / n, "aux_loss": interval["aux"] / n,
                    "lr": lr, "grad_norm": interval["gn"] / n,
                    "tokens_per_s": n * tokens_per_step / max(interval["time"], 1e-9),
                    "epoch": data.epoch_of_step(step_done, accum, dist.data_world),
                    "layers": stats.summary(),
                }
                log.write(rec)
                tb.train(rec)
                progress.update(step_done, rec)
                stats.reset()
                interval = {k: 0.0 if k != "n" else 0 for k in interval}
            else:
                progress.update(step_done)
            if cfg.eval.every > 0 and step_done % cfg.eval.every == 0 and step_done != steps:
                run_eval(step_done)
            if cfg.checkpoint.every > 0 and step_done % cfg.checkpoint.every == 0:
                save(step_done)
        if not result.evals or result.evals[-1]["step"] != steps:
            run_eval(steps)
        if cfg.checkpoint.at_end:
            save(steps)
    except NonFiniteError as err:
        if log is not None:
            log.write({"kind": "event", "step": result.steps + 1, "message": str(err)})
        raise
    finally:
        progress.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    dist.teardown()
    return result
