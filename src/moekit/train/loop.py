"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, evaluation,
checkpoints, non-finite detection. Importable so a test can run one step.

Shape legend: B sequences per micro-batch, L tokens per sequence, V vocabulary.

    result = train(run_config, out_dir)              # fresh run
    result = train(run_config, out_dir, resume=True) # continue from the newest checkpoint

Determinism: the model is built right after `torch.manual_seed(seed)`, batches are a pure function
of the step (see data.py), and checkpoints carry the RNG states, so on CPU a run resumed at step
N/2 reproduces the uninterrupted run's losses bit for bit.

Under `torchrun` (WORLD_SIZE > 1) the model is handed to `moekit.parallel` and each rank reads its
own interleaved slice of every global batch; only rank 0 touches the output folder (lock, logs,
metadata, checkpoints, cache).

The output folder is locked for the whole call (runfolder.py): a second writer gets an error
naming the holder, and nothing in the folder is touched before the lock is held.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from moekit.layers.moe import apply_router_updates, needs_router_updates
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig, to_dict
from moekit.train.data import LMData
from moekit.train.distributed import check_launch, launch_rank, setup_distributed
from moekit.train.metrics import IntervalStats, JsonlLog, Progress, TensorBoardLog
from moekit.train.nonfinite import NonFiniteError, nonfinite_message
from moekit.train.resume import check_resume_config, final_eval_logged, resume_point
from moekit.train.runfolder import open_run_folder, read_run_json, write_atomic
from moekit.train.steps import (  # noqa: F401  (lr_at and the rest: the loop's public pieces, imported from here too)
    IGNORE,
    autocast,
    build_optimizer,
    evaluate,
    lm_loss_sum,
    lr_at,
    micro_lm_loss,
    resolve_device,
    trained_counts,
    use_bf16,
)
from moekit.train.testeval import evaluate_test, make_test_record


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
    test_bpb: float | None = None  # the final test evaluation (eval.test), on the whole test split
    test: dict | None = None  # its record: test_loss, test_bpb, test_tokens, test_bytes, ...
    already_finished: bool = False  # a --resume of a finished run: nothing was trained or written


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


def _fit_to_data(cfg: RunConfig, data: LMData) -> RunConfig:
    """`cfg` with the model's vocabulary set by the tokenizer; sequences must fit the model."""
    model_cfg = cfg.model
    if (getattr(data, "sets_vocab", True) and hasattr(model_cfg, "vocab_size")  # fine-tuning data keeps the model's
            and model_cfg.vocab_size != data.tokenizer.vocab_size):
        # The tokenizer decides the vocabulary; keep the config honest about it.
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.vocab_size)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if hasattr(model_cfg, "max_seq_len") and model_cfg.max_seq_len < cfg.data.seq_len:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len}); "
            f"raise model.max_seq_len or shorten data.seq_len"
        )
    return cfg


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
    checkpoint_files: Callable[[Path, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `cfg.model` on `cfg.data` and write logs and checkpoints under `out_dir`.

    `data` lets several runs share one loaded corpus (compare), or brings other data with the
    same interface (fine-tuning); `before_step(step, model)` is a test seam (fault injection)
    called before each optimizer step; `checkpoint_files(folder, model)` writes extra files into
    each checkpoint's temporary folder, before its manifest hashes them and the folder is
    committed (fine-tuning's adapter files).

    `out_dir` must be new, empty or a moekit run folder; it is locked until the call returns
    (RunFolderBusy names the process holding it). A `resume` of a finished run changes nothing and
    returns with `already_finished` set.
    """
    out = Path(out_dir)
    label = label or cfg.name
    ck_root = out / "checkpoints"
    # Checks that need no file first: a wrong device or launch must not touch the folder.
    device = resolve_device(cfg)
    check_launch(cfg, "train")
    main = launch_rank() == 0
    lock = open_run_folder(out) if main else None  # only rank 0 writes the folder
    threads_before = torch.get_num_threads()
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        run = _Run(cfg, out, label, ck_root, device, resume=resume, overwrite=overwrite, data=data,
                   model_factory=model_factory, main=main)
        run.checkpoint_files = checkpoint_files
        if run.result.already_finished:
            if console is not None and main:
                console.print(f"{label}: already finished ({run.start_step} steps, checkpoint "
                              f"{run.resume_from.path}); nothing to do (raise schedule.steps to train "
                              f"further)", soft_wrap=True, markup=False)
            return run.result
        run.open_logs(console)
        return run.run(before_step)
    finally:
        torch.set_num_threads(threads_before)
        if lock is not None:
            lock.release()


@dataclass
class _Step:
    """What one optimizer step reports (losses are means over its micro-batches and the ranks)."""

    lr: float
    seconds: float  # wall-clock of the step
    cpu_seconds: float  # process CPU time of the step
    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float


class _Run:
    """One call of `train`: the state its steps share. Order of use: construct (prepare or
    resume), `open_logs`, `run`."""

    def __init__(self, cfg: RunConfig, out: Path, label: str, ck_root: Path, device: torch.device, *,
                 resume: bool, overwrite: bool, data: LMData | None, model_factory, main: bool = True):
        """Prepare the run: find the checkpoint to resume, load the data, build the model and its
        optimizer (and restore both), hand the model to the ranks. A resumed run that had already
        finished stops here, with `result.already_finished` set."""
        self.out, self.label, self.ck_root, self.device = out, label, ck_root, device
        self.bf16 = use_bf16(cfg, device)
        self.ctx = autocast(device, self.bf16)
        self.resume_from = resume_point(ck_root, resume, overwrite, main)
        if data is None:
            data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache", write_cache=main)
        self.data = data
        self.cfg = cfg = _fit_to_data(cfg, data)
        self.run_dict = to_dict(cfg)
        self.run_dict["model"] = _model_config_dict(cfg.model)

        torch.manual_seed(cfg.seed)
        factory = model_factory or _default_model_factory
        self.base_model = base_model = factory(cfg.model).to(device)
        base_model.train()
        self.optimizer = build_optimizer(base_model, cfg)
        params_total, params_active = _count(base_model)

        self.start_step, train_time, cpu_time, self.resume_diffs = 0, 0.0, 0.0, []
        self.interval = IntervalStats()
        if self.resume_from is not None:
            train_time, cpu_time = self._restore(self.resume_from)
        self.main = main
        self.result = TrainResult(out, label, self.start_step, 0, train_time, cpu_time, params_total, params_active)
        if self.resume_from is not None and self.start_step == cfg.schedule.steps:
            evals, test = final_eval_logged(out / "metrics.jsonl", self.start_step)
            if evals is not None:  # a resume must add no second final eval (nor test evaluation)
                self.result.evals, self.result.final_val_bpb = evals, evals[-1]["val_bpb"]
                self.result.tokens = int(self.resume_from.manifest.get("tokens", 0))
                if test is not None:
                    self.result.test, self.result.test_bpb = test, test["test_bpb"]
                if test is not None or not cfg.eval.test:  # finished; else only the test evaluation is left
                    self.result.already_finished = True
                    return
        model, self.dist = setup_distributed(base_model, cfg, device, self.optimizer)
        self.run_model = torch.compile(model) if cfg.compile else model
        self.manual_updates = needs_router_updates(base_model)

        self.tokens_per_step = cfg.tokens_per_step * self.dist.data_world
        self.val_batches = data.val_batches(cfg.eval.batches)
        self.main = main and self.dist.is_main  # rank 0 of torchrun (known from RANK before the group existed)
        self.result.tokens = self.start_step * self.tokens_per_step
        self.last_saved = self.start_step if self.resume_from is not None else -1
        self.log: JsonlLog | None = None
        self.tb: TensorBoardLog | None = None
        self.progress: Progress | None = None
        self.wall_start = 0.0  # set by open_logs: the time at step 0 (a resumed run's training time counted)
        self.checkpoint_files = None  # train()'s checkpoint_files

    def _restore(self, resume_from: ckpt.Checkpoint) -> tuple[float, float]:
        """Load the checkpoint's weights, optimizer and RNG state; (train_time, cpu_time) so far."""
        saved_cfg = json.loads((resume_from.path / "run_config.json").read_text())
        self.resume_diffs = check_resume_config(saved_cfg, self.run_dict)
        steps = self.cfg.schedule.steps
        if resume_from.step > steps:
            raise ValueError(
                f"--resume: the newest checkpoint {resume_from.path} is at step {resume_from.step}, past "
                f"schedule.steps={steps}; set schedule.steps={resume_from.step} or more to continue"
            )
        ckpt.load_training_state(resume_from, self.base_model, self.optimizer)
        self.start_step = resume_from.step
        if "interval" in resume_from.manifest:  # checkpoints before this field resume with an empty one
            self.interval.load_state_dict(resume_from.manifest["interval"])
        return float(resume_from.manifest.get("train_time", 0.0)), float(resume_from.manifest.get("cpu_time", 0.0))

    def open_logs(self, console) -> None:
        """run.json, metrics.jsonl (a resumed run drops the records after its checkpoint), TensorBoard
        and the progress bar. Only the main rank writes.

        A resume is recorded in run.json ("resumes": step, time, checkpoint, changed settings), not
        in metrics.jsonl, which stays record for record the uninterrupted run's."""
        start_step, resumed = self.start_step, self.resume_from is not None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.data.tokenizer.save(self.out)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.log = JsonlLog(self.out / "metrics.jsonl", truncate_after_step=start_step if resumed else None)
            previous = read_run_json(self.out / "run.json") if resumed else {}
            resumes = list(previous.get("resumes", []))
            if resumed:
                entry = {"step": start_step, "time": now, "checkpoint": str(self.resume_from.path),
                         "command": sys.argv, "changed": self.resume_diffs}
                if self.log.torn_line is not None:
                    # A write cut short by the kill (or a full disk): its step was past the checkpoint
                    # or is lost; the rest of the log is intact.
                    entry["dropped_torn_line"] = self.log.torn_line.decode("utf-8", errors="replace")[:200]
                    _warn(console, f"{self.log.path}: dropped its last line, cut short by the interruption "
                                   f"({len(self.log.torn_line)} bytes, no newline)")
                resumes.append(entry)
                msg = f"resumed from {self.resume_from.path} at step {start_step}"
                if self.resume_diffs:
                    msg += f" (changed: {', '.join(self.resume_diffs[:8])})"
                if console is not None:
                    console.print(msg, soft_wrap=True, markup=False)
            meta = {
                "label": self.label,
                "config": self.run_dict,
                "data": self.data.info,
                "params": {"total": self.result.params_total, "active": self.result.params_active},
                "device": str(self.device),
                "precision": "bf16" if self.bf16 else "fp32",
                "machine": _machine(),
                "command": previous.get("command", sys.argv),
                "started": previous.get("started", now),
                "resumes": resumes,
            }
            write_atomic(self.out / "run.json", json.dumps(meta, indent=2))
            self.tb = TensorBoardLog(self.out / "tensorboard", self.cfg.logging.tensorboard)
        self.progress = Progress(self.cfg.schedule.steps, start_step, self.label,
                                 enabled=self.main and self.cfg.logging.progress, console=console)
        self.wall_start = time.perf_counter() - self.result.train_time

    def run(self, before_step) -> TrainResult:
        """From the start (or resumed) step to the last: train, log, evaluate, save; then the final
        evaluation and checkpoint."""
        cfg, steps, result = self.cfg, self.cfg.schedule.steps, self.result
        try:
            if self.start_step == 0 and cfg.eval.every > 0:
                self.run_eval(0)
            for step in range(self.start_step, steps):
                if before_step is not None:
                    before_step(step, self.base_model)
                s = self.train_step(step)
                step_done = step + 1
                result.cpu_time += s.cpu_seconds
                result.train_time += s.seconds
                result.tokens += self.tokens_per_step
                result.steps = step_done
                result.losses.append(s.loss)
                self.interval.add(loss=s.loss, lm_loss=s.lm_loss, aux_loss=s.aux_loss, grad_norm=s.grad_norm,
                                  lr=s.lr, seconds=s.seconds)
                self.log_interval(step_done)
                if cfg.eval.every > 0 and step_done % cfg.eval.every == 0 and step_done != steps:
                    self.run_eval(step_done)
                if cfg.checkpoint.every > 0 and step_done % cfg.checkpoint.every == 0:
                    self.save(step_done)
            if not result.evals or result.evals[-1]["step"] != steps:
                self.run_eval(steps)
            if cfg.checkpoint.at_end:
                self.save(steps)
            if cfg.eval.test and result.test is None:  # after the checkpoint: a kill here resumes to just this
                self.run_test(steps)
        except NonFiniteError as err:
            if self.log is not None:
                self.log.write({"kind": "event", "step": result.steps + 1, "message": str(err)})
            raise
        finally:
            self.progress.close()
            if self.log is not None:
                self.log.close()
            if self.tb is not None:
                self.tb.close()
        self.dist.teardown()
        return result

    def train_step(self, step: int) -> _Step:
        """Optimizer step `step` (0-based): the micro-batches' forward and backward, the non-finite
        checks, clipping, the update and the routers' bias updates."""
        cfg, dist, base_model, ctx = self.cfg, self.dist, self.base_model, self.ctx
        accum = cfg.optim.grad_accum
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, lms, auxes = [], [], []
        x_BL = None
        batches = [self.data.train_batch(step, micro, accum, dist.data_rank, dist.data_world) for micro in range(accum)]
        counts, total = trained_counts([y for _, y in batches])
        for (x_BL, y_BL), count in zip(batches, counts, strict=True):
            x_BL, y_BL = x_BL.to(self.device), y_BL.to(self.device)
            with ctx:
                out = self.run_model(x_BL)
            lm = micro_lm_loss(out.logits, y_BL, count, total, accum)  # the mean over trained targets
            loss = lm + out.aux_loss.float()
            (loss / accum).backward()
            losses.append(loss.detach())
            lms.append(lm.detach())
            auxes.append(out.aux_loss.detach().float())
            self.interval.layers.add(out.layer_metrics)
        step_loss = dist.mean(torch.stack(losses).mean())
        if not torch.isfinite(step_loss):
            raise NonFiniteError(nonfinite_message("loss", step + 1, base_model, x_BL, ctx))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = dist.clip_grad_norm_(base_model, clip)
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(nonfinite_message("gradient", step + 1, base_model, None, ctx))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.manual_updates:
            apply_router_updates(base_model)
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        return _Step(lr=lr, seconds=seconds, cpu_seconds=cpu_seconds, loss=float(step_loss),
                     lm_loss=float(torch.stack(lms).mean()), aux_loss=float(torch.stack(auxes).mean()),
                     grad_norm=float(grad_norm))

    def log_interval(self, step_done: int) -> None:
        """Every logging.every steps and at the last: the interval's train record (JSONL,
        TensorBoard, progress bar), then a new interval. Other steps only move the progress bar."""
        cfg, result = self.cfg, self.result
        if not (self.main and (step_done % cfg.logging.every == 0 or step_done == cfg.schedule.steps)):
            self.progress.update(step_done)
            return
        rec = {
            "kind": "train", "step": step_done, "tokens": result.tokens, "time": result.train_time,
            "cpu_time": result.cpu_time,
            "elapsed": time.perf_counter() - self.wall_start,
            **self.interval.means(self.tokens_per_step),
            "epoch": self.data.epoch_of_step(step_done, cfg.optim.grad_accum, self.dist.data_world),
            "layers": self.interval.layers.summary(),
        }
        self.log.write(rec)
        self.tb.train(rec)
        self.progress.update(step_done, rec)
        self.interval.reset()

    def run_eval(self, step_done: int) -> None:
        # Every rank evaluates (the EP forward is collective); only the main rank records it.
        val_loss, val_bpb = evaluate(self.run_model, self.val_batches, self.data.token_bytes, self.device, self.ctx)
        if not self.main:
            return
        result = self.result
        rec = {"kind": "eval", "step": step_done, "tokens": result.tokens, "time": result.train_time,
               "cpu_time": result.cpu_time,
               "elapsed": time.perf_counter() - self.wall_start, "val_loss": val_loss, "val_bpb": val_bpb}
        result.evals.append(rec)
        result.final_val_bpb = val_bpb
        self.log.write(rec)
        self.tb.eval(rec)
        self.progress.update(step_done, val_bpb=val_bpb)

    def run_test(self, step_done: int) -> None:
        """The final test evaluation (testeval.py): the whole test split, once; recorded in
        metrics.jsonl ("test") and run.json ("test"). Every rank evaluates (the EP forward is
        collective); only the main rank records it."""
        scores = evaluate_test(self.run_model, self.data, self.device, self.ctx)
        if scores is None or not self.main:
            return
        clock = {"time": self.result.train_time, "cpu_time": self.result.cpu_time,
                 "elapsed": time.perf_counter() - self.wall_start}
        rec = make_test_record(scores, step_done, self.result.tokens, clock)
        self.result.test, self.result.test_bpb = rec, rec["test_bpb"]
        self.log.write(rec)
        meta = read_run_json(self.out / "run.json")
        meta["test"] = {**rec, "seconds": scores["seconds"]}
        write_atomic(self.out / "run.json", json.dumps(meta, indent=2))

    def save(self, step_done: int) -> None:
        """A checkpoint after `step_done` steps, unless the last one saved is that one."""
        if step_done == self.last_saved:
            return
        # Under EP every rank takes part in gathering the full model; only the main rank writes.
        with self.dist.full_model(self.base_model, self.optimizer):
            if self.main:
                ckpt.save_training_checkpoint(
                    self.ck_root, step_done, self.base_model, self.optimizer,
                    model_config=self.run_dict["model"], run_config=self.run_dict, tokenizer=self.data.tokenizer,
                    extra={"train_time": self.result.train_time, "cpu_time": self.result.cpu_time,
                           "tokens": self.result.tokens, "label": self.label,
                           # the steps since the last train record, so a resume logs the same records
                           "interval": self.interval.state_dict()},
                    keep_last=self.cfg.checkpoint.keep_last,
                    write_extra=None if self.checkpoint_files is None else
                    (lambda folder: self.checkpoint_files(folder, self.base_model)),
                )
        self.last_saved = step_done


def _warn(console, message: str) -> None:
    if console is not None:
        console.print(f"warning: {message}", soft_wrap=True, markup=False, style="yellow")
    else:
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)
