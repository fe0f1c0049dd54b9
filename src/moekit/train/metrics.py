"""Training metrics: per-layer routing aggregation, the logging interval's sums, the JSONL log,
TensorBoard and the progress bar.

The JSONL file (`metrics.jsonl`) is always written and is what the report reads. One record per
line, with "kind":
  "train": step, tokens, time (training seconds, evals and checkpoints excluded), cpu_time
           (process CPU seconds of those steps, all threads), elapsed (wall-clock since start),
           loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_s, epoch and
           "layers": {layer index: {tokens_per_expert, drop_fraction, router_entropy,
           load_imbalance, experts_without_tokens}}
  "eval":  step, tokens, time, cpu_time, elapsed, val_loss (nats per token), val_bpb (bits per byte)
  "event": step, message (resume, non-finite stop, ...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

LAYER_SCALARS = ("drop_fraction", "router_entropy", "load_imbalance", "experts_without_tokens")


class LayerStats:
    """Sums the model's per-layer routing metrics over micro-batches and steps between logs."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, layer_metrics) -> None:
        if not layer_metrics:
            return
        self.count += 1
        for layer, m in layer_metrics:
            acc = self.layers.setdefault(int(layer), {})
            for key, value in m.items():
                if key == "tokens_per_expert" or key in LAYER_SCALARS or key.startswith("loss/"):
                    v = value.detach().float().cpu()
                    acc[key] = acc[key] + v if key in acc else v.clone()

    def summary(self) -> dict[str, dict]:
        """Per layer: tokens_per_expert summed, scalars averaged over the micro-batches seen."""
        out = {}
        for layer, acc in sorted(self.layers.items()):
            rec = {}
            for key, v in acc.items():
                if key == "tokens_per_expert":
                    rec[key] = [round(float(x), 3) for x in v.tolist()]
                else:
                    rec[key] = float(v) / max(self.count, 1)
            out[str(layer)] = rec
        return out


class IntervalStats:
    """The optimizer steps since the last train record: sums of their values, the learning rate
    of the last one, and their routing statistics (`layers`, added per micro-batch)."""

    def __init__(self):
        self.layers = LayerStats()
        self.reset()

    def reset(self) -> None:
        self.loss = self.lm_loss = self.aux_loss = self.grad_norm = self.seconds = 0.0
        self.steps = 0
        self.lr = 0.0
        self.layers.reset()

    def add(self, *, loss: float, lm_loss: float, aux_loss: float, grad_norm: float, lr: float,
            seconds: float) -> None:
        self.loss += loss
        self.lm_loss += lm_loss
        self.aux_loss += aux_loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.seconds += seconds
        self.lr = lr

    def means(self, tokens_per_step: int) -> dict:
        """The train record's fields loss ... tokens_per_s, in the record's order."""
        n = self.steps
        return {"loss": self.loss / n, "lm_loss": self.lm_loss / n, "aux_loss": self.aux_loss / n, "lr": self.lr,
                "grad_norm": self.grad_norm / n, "tokens_per_s": n * tokens_per_step / max(self.seconds, 1e-9)}


def mean_over_layers(layers: dict[str, dict], key: str) -> float | None:
    values = [rec[key] for rec in layers.values() if key in rec]
    return sum(values) / len(values) if values else None


class JsonlLog:
    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run replays steps after its checkpoint: drop their old records.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """TensorBoard scalars when `tensorboard` is installed ("auto"), required ("on") or off."""

    def __init__(self, directory: Path, mode: str):
        self.writer = None
        if mode == "off":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode == "on":
                raise ImportError("logging.tensorboard=on needs the `tensorboard` package") from None
            return
        self.writer = SummaryWriter(log_dir=str(directory))

    def train(self, rec: dict) -> None:
        if self.writer is None:
            return
        step = rec["step"]
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
            if rec.get(key) is not None and math.isfinite(rec[key]):
                self.writer.add_scalar(f"train/{key}", rec[key], step)
        for layer, m in rec.get("layers", {}).items():
            tpe = m.get("tokens_per_expert")
            if tpe:
                total = sum(tpe) or 1.0
                for e, v in enumerate(tpe):
                    self.writer.add_scalar(f"moe/layer{layer}/expert_load/{e}", v / total, step)
            for key in LAYER_SCALARS:
                if key in m:
                    self.writer.add_scalar(f"moe/layer{layer}/{key}", m[key], step)

    def eval(self, rec: dict) -> None:
        if self.writer is not None:
            self.writer.add_scalar("val/bpb", rec["val_bpb"], rec["step"])
            self.writer.add_scalar("val/loss", rec["val_loss"], rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar showing loss, tokens/s, aux loss and drop fraction; silent if disabled."""

    def __init__(self, total: int, start: int, label: str, enabled: bool, console=None):
        self.bar = None
        self.console, self.label, self.total = console, label, total
        if not enabled:
            return
        if console is not None and not console.is_terminal:
            self.lines = True  # a log file: one line per evaluation, no live bar
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, completed=start, stats="")

    lines = False

    def update(self, step: int, rec: dict | None = None, val_bpb: float | None = None) -> None:
        if self.lines and val_bpb is not None:
            self.console.print(f"{self.label}: step {step}/{self.total}  val {val_bpb:.3f} bpb", soft_wrap=True)
        if self.bar is None:
            return
        fields = {}
        if rec is not None:
            drop = mean_over_layers(rec.get("layers", {}), "drop_fraction")
            stats = f"loss {rec['loss']:.3f}  {rec['tokens_per_s']:,.0f} tok/s  aux {rec['aux_loss']:.4f}"
            if drop is not None:
                stats += f"  drop {100 * drop:.1f}%"
            self._stats = stats
        if val_bpb is not None:
            self._val = f"  val {val_bpb:.3f} bpb"
        fields["stats"] = getattr(self, "_stats", "") + getattr(self, "_val", "")
        self.bar.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
