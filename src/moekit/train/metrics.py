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
  "test":  once, at the end of a run (eval.test; testeval.py): step, tokens, time, cpu_time,
           elapsed, test_loss, test_bpb, test_tokens, test_bytes, test_files, torch_threads
  "event": step, message (a non-finite stop)
Resumes are recorded in run.json ("resumes"), not here: a resumed run's metrics.jsonl is the
uninterrupted run's, record for record (wall-clock fields aside).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moekit.train.runfolder import write_atomic

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

    def state_dict(self) -> dict:
        """JSON-able and exact: float32 values as Python floats (a float64 holds each exactly)."""
        return {"count": self.count,
                "layers": {str(layer): {key: {"shape": list(v.shape), "values": v.flatten().tolist()}
                                        for key, v in acc.items()}
                           for layer, acc in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.layers = {int(layer): {key: torch.tensor(v["values"], dtype=torch.float32).reshape(v["shape"])
                                    for key, v in acc.items()}
                       for layer, acc in state["layers"].items()}


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

    def state_dict(self) -> dict:
        """The interval so far, JSON-able: saved with a checkpoint so that a run resumed between two
        train records writes the next one over the same steps as the uninterrupted run."""
        return {"loss": self.loss, "lm_loss": self.lm_loss, "aux_loss": self.aux_loss, "grad_norm": self.grad_norm,
                "seconds": self.seconds, "steps": self.steps, "lr": self.lr, "layers": self.layers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "seconds", "lr"):
            setattr(self, key, float(state[key]))
        self.steps = int(state["steps"])
        self.layers.load_state_dict(state["layers"])

    def means(self, tokens_per_step: int) -> dict:
        """The train record's fields loss ... tokens_per_s, in the record's order."""
        n = self.steps
        return {"loss": self.loss / n, "lm_loss": self.lm_loss / n, "aux_loss": self.aux_loss / n, "lr": self.lr,
                "grad_norm": self.grad_norm / n, "tokens_per_s": n * tokens_per_step / max(self.seconds, 1e-9)}


def mean_over_layers(layers: dict[str, dict], key: str) -> float | None:
    values = [rec[key] for rec in layers.values() if key in rec]
    return sum(values) / len(values) if values else None


class JsonlLog:
    """metrics.jsonl, appended one line per record (line-buffered: a kill leaves at most the last
    line torn). A resumed run (`truncate_after_step`) first drops the records after its checkpoint
    by rewriting the file atomically; a torn last line is dropped too and kept in `torn_line`, for
    the caller to report."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_line: bytes | None = None
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):  # a rewrite killed midway
            stale.unlink(missing_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run replays the steps after its checkpoint: drop their old records. The
            # rewrite is atomic: a kill or a full disk leaves the old file, never a cut one.
            lines, self.torn_line = parse_jsonl(self.path.read_bytes(), self.path)
            kept = [raw for raw, rec in lines if rec.get("step", 0) <= truncate_after_step]
            write_atomic(self.path, b"".join(raw + b"\n" for raw in kept))
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")

    def close(self) -> None:
        self._f.close()


def parse_jsonl(data: bytes, path: Path) -> tuple[list[tuple[bytes, dict]], bytes | None]:
    """(raw line, record) of every record in a JSONL file's bytes, and its torn last line (None if
    it has none). A torn line is a last line without a newline that is not a whole record: a write
    cut short (a kill, a full disk, or a run still writing it). Any other line that is not a JSON
    object is an error naming the file and the line."""
    lines = data.split(b"\n")
    out, torn = [], None
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(lines) - 1:  # no newline after it
                torn = raw
                continue
            raise ValueError(
                f"{path}, line {i + 1}: not a valid record ({err}); repair or delete that line (a damaged "
                f"log cannot be resumed or reported as it is)"
            ) from None
        out.append((raw, rec))
    return out, torn


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a run still writing it) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    return [rec for _, rec in parse_jsonl(path.read_bytes(), path)[0]]


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
