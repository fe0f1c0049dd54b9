"""The run configuration: one typed tree (model, data, optim, schedule, eval, checkpoint, logging,
parallel) built by a preset function and edited with `--set a.b=c`.

Every section is a dataclass validated in `__post_init__`, with errors that name the field and
the allowed values. The `--set` parser is overrides.py; `apply_override(s)` and `valid_keys`
are re-exported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# overrides.py needs this module's classes for type hints only, so importing it here is no cycle.
from moekit.train.overrides import apply_override, apply_overrides, valid_keys  # noqa: F401 (re-exported)
from moekit.validate import check_bool, check_choice, check_float, check_int

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZERS = ("byte", "bpe")
TENSORBOARD = ("auto", "on", "off")


@dataclass
class DataConfig:
    # None = the Python standard library's own .py source of the running interpreter.
    path: str | None = None
    include: str = "*.py"  # glob applied recursively when `path` is a directory
    exclude_tests: bool = True  # skip test/ tests/ idle_test/ folders and test_*.py files
    max_bytes: int | None = None  # keep only the first files (sorted) up to this many bytes
    val_fraction: float = 0.05  # share of files (chosen by a hash of their path) held out
    # Test split: among the files that are not validation, a second, independent hash of the path
    # picks this share; files are then added (in that hash's order) until the test split holds at
    # least test_min_bytes, while it stays within a quarter of the non-validation bytes. The
    # default, 1 MB, is what issue 18 asks of the final test evaluation: enough text that the
    # seed-to-seed spread, not the sample, dominates; on the stdlib (12 MB) it costs about one
    # forward pass over 1 MB per run. Read only by the final test evaluation (eval.test).
    test_fraction: float = 0.05
    test_min_bytes: int = 1_000_000
    tokenizer: str = "byte"  # "byte": 256 ids, one per byte; "bpe": byte-level BPE (tokenizers)
    bpe_vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch on each rank

    def __post_init__(self):
        s = "data"
        if self.path is not None and not isinstance(self.path, str):
            raise TypeError(f"data.path must be a path string or None, got {self.path!r}")
        if not isinstance(self.include, str) or not self.include:
            raise ValueError(f"data.include must be a non-empty glob pattern, got {self.include!r}")
        check_bool(s, "exclude_tests", self.exclude_tests)
        if self.max_bytes is not None:
            check_int(s, "max_bytes", self.max_bytes, 1)
        check_float(s, "val_fraction", self.val_fraction, minimum=0.0, strict=True, maximum=0.5)
        check_float(s, "test_fraction", self.test_fraction, minimum=0.0, strict=False, maximum=0.5)
        check_int(s, "test_min_bytes", self.test_min_bytes, 0)
        check_choice(s, "tokenizer", self.tokenizer, TOKENIZERS)
        check_int(s, "bpe_vocab_size", self.bpe_vocab_size, 257)
        check_int(s, "seq_len", self.seq_len, 2)
        check_int(s, "batch_size", self.batch_size, 1)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warmup
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        s = "optim"
        check_float(s, "lr", self.lr, minimum=0.0, strict=True, maximum=10.0)
        check_float(s, "weight_decay", self.weight_decay, minimum=0.0, strict=False)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_float(s, name, value, minimum=0.0, strict=False, maximum=1.0)
            if value >= 1.0:  # a beta of 1 never updates its moment (torch refuses it, unnamed)
                raise ValueError(f"optim.{name} must be in [0, 1), got {value}")
        check_float(s, "eps", self.eps, minimum=0.0, strict=True, maximum=1.0)
        check_float(s, "grad_clip", self.grad_clip, minimum=0.0, strict=False)
        check_int(s, "grad_accum", self.grad_accum, 1)


@dataclass
class ScheduleConfig:
    steps: int = 1000  # optimizer steps
    warmup_steps: int = 100  # linear warmup from 0 to optim.lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step

    def __post_init__(self):
        s = "schedule"
        check_int(s, "steps", self.steps, 1)
        check_int(s, "warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"schedule.warmup_steps ({self.warmup_steps}) must be <= schedule.steps ({self.steps})")
        check_float(s, "min_lr_ratio", self.min_lr_ratio, minimum=0.0, strict=False, maximum=1.0)


@dataclass
class EvalConfig:
    every: int = 100  # steps between validation passes (0 = only at the end)
    batches: int = 8  # validation micro-batches (data.batch_size sequences each)
    # At the end of the run, score the whole test split once (every token, non-overlapping
    # windows of data.seq_len): the "test" record in metrics.jsonl and run.json's "test".
    test: bool = True

    def __post_init__(self):
        check_int("eval", "every", self.every, 0)
        check_int("eval", "batches", self.batches, 1)
        check_bool("eval", "test", self.test)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    at_end: bool = True

    def __post_init__(self):
        check_int("checkpoint", "every", self.every, 0)
        check_int("checkpoint", "keep_last", self.keep_last, 1)
        check_bool("checkpoint", "at_end", self.at_end)


@dataclass
class LoggingConfig:
    every: int = 10  # steps between train-metric records (JSONL, TensorBoard, progress bar)
    progress: bool = True  # rich progress bar
    tensorboard: str = "auto"  # "auto": when tensorboard is installed; "on": required; "off"

    def __post_init__(self):
        check_int("logging", "every", self.every, 1)
        check_bool("logging", "progress", self.progress)
        check_choice("logging", "tensorboard", self.tensorboard, TENSORBOARD)


@dataclass
class CompareConfig:
    """Settings only `moekit compare` reads; `moekit train` ignores them."""

    # Learning rate of the two dense twins; None = optim.lr for all three. Sparse and dense
    # models need not share an optimum: measured here the MoE's best peak LR is lower than the
    # dense models' (docs/results/compare.md), and each is compared at its own.
    dense_lr: float | None = None

    def __post_init__(self):
        if self.dense_lr is not None:
            check_float("compare", "dense_lr", self.dense_lr, minimum=0.0, strict=True, maximum=10.0)


def _parallel_config_cls():
    """The EP helper's `moekit.parallel.ParallelConfig` once it exists, else a minimal stand-in."""
    for module in ("moekit.parallel", "moekit.parallel.config"):
        try:
            return __import__(module, fromlist=["ParallelConfig"]).ParallelConfig
        except (ImportError, AttributeError):
            continue
    return _LocalParallelConfig


@dataclass
class _LocalParallelConfig:
    """Stand-in with the same fields until `moekit.parallel.ParallelConfig` lands."""

    dp: int = 1
    ep: int = 1
    backend: str = "auto"

    def __post_init__(self):
        check_int("parallel", "dp", self.dp, 1)
        check_int("parallel", "ep", self.ep, 1)
        check_choice("parallel", "backend", self.backend, ("auto", "gloo", "nccl"))


@dataclass
class RunConfig:
    model: Any  # the model's config dataclass (moekit.models)
    name: str = "run"
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = "auto"  # "auto": bf16 autocast on a CUDA device that supports it, else fp32
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch.set_num_threads on CPU; 0 = leave torch's default
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: Any = field(default_factory=lambda: _parallel_config_cls()())
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.model) or isinstance(self.model, type):
            raise TypeError(f"run.model must be a model config dataclass instance, got {type(self.model).__name__}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"run.name must be a non-empty string, got {self.name!r}")
        check_int("run", "seed", self.seed, 0)
        check_choice("run", "device", self.device, DEVICES)
        check_choice("run", "precision", self.precision, PRECISIONS)
        check_bool("run", "compile", self.compile)
        check_int("run", "threads", self.threads, 0)
        for name, cls in (("data", DataConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
                          ("eval", EvalConfig), ("checkpoint", CheckpointConfig), ("logging", LoggingConfig),
                          ("compare", CompareConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"run.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step on one rank (multiply by the data-parallel size)."""
        return self.data.batch_size * self.data.seq_len * self.optim.grad_accum


# ----------------------------------------------------------------------------- serialisation


def to_dict(obj: Any) -> Any:
    """A JSON-ready dict of any config tree (dataclasses, tuples, dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def diff_dicts(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `to_dict` trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out.extend(diff_dicts(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return [] if a == b else [prefix.rstrip(".")]
