"""The fine-tuning job: a base checkpoint, a JSONL file and a method, run through moekit's trainer.

    report = finetune("runs/base", "data.jsonl", "lora", "runs/ft", sets=["lora.rank=8", "schedule.steps=200"])
    model = load_finetuned("runs/ft")  # the adapted model of the run's newest checkpoint

Methods: `full` trains every parameter; `lora` puts adapters on `lora.targets` of the float base
(finetune/lora.py); `qlora` first stores the frozen base quantized (`qlora.bits` 4 = NF4, or 8,
blocks of `qlora.block`), then adds the adapters. Everything else is `moekit train`'s: the same
`schedule.*`, `optim.*`, `eval.*`, `checkpoint.*`, `logging.*` keys, progress bar, logs, atomic
checkpoints and bit-identical resume (the trainer holds the run folder's lock; nothing here
writes into the folder outside the trainer's checkpoints and the final report).

Every checkpoint holds `finetune.json` (method, LoRA/QLoRA settings, the base checkpoint's path
and content hash, the data file's hash) beside the trainer's files, so `load_finetuned` rebuilds
the model from the base and refuses a base that moved or changed. At the end `report.json` (and
the console) gives trainable parameters, peak memory, tokens/s, validation loss and bits/byte and
test bits/byte of the base and of the fine-tuned model, and each MoE layer's expert load on the
validation data before and after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from moekit.finetune.data import FinetuneData
from moekit.finetune.lora import LoraSpec, apply_lora, lora_sites, quantize_base, trainable_summary
from moekit.finetune.report import base_scores, build_report, expert_load
from moekit.models.io import resolve_checkpoint
from moekit.models.quantize import state_bytes
from moekit.train import checkpoint as ck
from moekit.train.config import DataConfig, EvalConfig, RunConfig, ScheduleConfig, apply_overrides
from moekit.train.runfolder import write_atomic

METHODS = ("lora", "qlora", "full")
FINETUNE_JSON = "finetune.json"
# The keys --set may change: the model comes from --checkpoint and the data from --data.
RUN_SECTIONS = ("schedule", "optim", "eval", "checkpoint", "logging", "lora", "qlora", "routing")
FT_SECTIONS = ("lora", "qlora", "routing")
RUN_FIELDS = ("name", "seed", "device", "precision", "threads", "compile")
DATA_FIELDS = ("seq_len", "batch_size", "val_fraction", "test_fraction")
ALLOWED = ", ".join([f"{s}.*" for s in RUN_SECTIONS] + [f"data.{f}" for f in DATA_FIELDS] + list(RUN_FIELDS))


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("experts", "attention")  # of experts, shared_experts, attention, dense_ffn, router
    experts: tuple[int, ...] | None = None  # None: every routed expert
    rslora: bool = False
    train_router: bool = False
    train_norms: bool = False

    def __post_init__(self):
        self.spec()  # LoraSpec validates every field, naming it

    def spec(self) -> LoraSpec:
        return LoraSpec(**dataclasses.asdict(self))


@dataclass
class QloraSettings:
    bits: int = 4  # 4: NF4 (the QLoRA paper's code); 8: int8
    block: int = 64  # weights per scale

    def __post_init__(self):
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"qlora.bits must be 4 or 8, got {self.bits!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"qlora.block must be an integer >= 2, got {self.block!r}")


@dataclass
class RoutingSettings:
    """How the routers balance during fine-tuning. None keeps what the base was trained with: its
    balance loss weights and, for DeepSeek-style routers (sigmoid_bias), its bias update rate
    (0 freezes the bias)."""

    aux_loss_coef: float | None = None
    z_loss_coef: float | None = None
    bias_update_rate: float | None = None

    def __post_init__(self):
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"routing.{name} must be a number >= 0 (or unset to keep the base's), got {value!r}")


def apply_routing(model: nn.Module, routing: RoutingSettings) -> None:
    """Set the routers' balancing for fine-tuning, in place (a setting left None is not touched)."""
    from moekit.layers.moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if routing.bias_update_rate is not None and not any(
            hasattr(getattr(m.router, "opts", None), "bias_update_rate") for m in layers):
        raise ValueError("routing.bias_update_rate: this model has no router with a bias update (sigmoid_bias)")
    for moe in layers:
        for cfg in {id(c): c for c in (moe.cfg, getattr(moe.router, "cfg", moe.cfg))}.values():
            for name in ("aux_loss_coef", "z_loss_coef"):
                if getattr(routing, name) is not None:
                    setattr(cfg, name, float(getattr(routing, name)))
        opts = getattr(moe.router, "opts", None)
        if routing.bias_update_rate is not None and hasattr(opts, "bias_update_rate"):
            object.__setattr__(opts, "bias_update_rate", float(routing.bias_update_rate))


@dataclass
class FinetuneConfig:
    """The run config of `moekit train` plus the method and its settings."""

    run: RunConfig
    method: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QloraSettings = field(default_factory=QloraSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")


def _check_key(assignment: str) -> str:
    key = assignment.split("=", 1)[0].strip()
    parts = key.split(".")
    ok = (parts[0] in RUN_SECTIONS or (len(parts) == 1 and parts[0] in RUN_FIELDS)
          or (parts[0] == "data" and len(parts) == 2 and parts[1] in DATA_FIELDS))
    if not ok:
        why = " (the model comes from --checkpoint)" if parts[0] == "model" else \
            " (the data comes from --data)" if parts[0] == "data" else ""
        raise ValueError(f"--set {key}: not a fine-tuning setting{why}; allowed: {ALLOWED}")
    return parts[0]


def build_config(model_cfg, data_path: Path, method: str, sets: list[str]) -> FinetuneConfig:
    """Defaults for fine-tuning (a smaller peak learning rate than pretraining, no decay on the
    adapters) with `sets` applied and validated, each error naming the field."""
    ctx = getattr(model_cfg, "max_seq_len", 512)
    run = RunConfig(
        model=model_cfg, name=f"finetune-{method}",
        data=DataConfig(path=str(Path(data_path).resolve()), val_fraction=0.1, test_fraction=0.1, test_min_bytes=0,
                        seq_len=min(ctx, 512), batch_size=8),
        schedule=ScheduleConfig(steps=100, warmup_steps=0),  # a tenth of the steps unless set (below)
        eval=EvalConfig(every=25, batches=16),
    )
    run = dataclasses.replace(run, optim=dataclasses.replace(run.optim, lr=2e-5 if method == "full" else 2e-4,
                                                            weight_decay=0.0))
    run = dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, every=50))
    cfg = FinetuneConfig(run, method)
    run_sets = [s for s in sets if _check_key(s) not in FT_SECTIONS]
    ft_sets = [s for s in sets if _check_key(s) in FT_SECTIONS]
    run = apply_overrides(run, run_sets)
    if not any(s.split("=", 1)[0].strip() == "schedule.warmup_steps" for s in run_sets):
        warmup = run.schedule.steps // 10
        run = dataclasses.replace(run, schedule=dataclasses.replace(run.schedule, warmup_steps=warmup))
    cfg = dataclasses.replace(cfg, run=run)
    cfg = apply_overrides(cfg, ft_sets)
    if cfg.run.data.seq_len > ctx:
        raise ValueError(f"--set data.seq_len={cfg.run.data.seq_len}: past the model's context of {ctx} tokens "
                         f"(max_seq_len)")
    return cfg


# ----------------------------------------------------------------------------- the base


def base_hash(ref) -> str:
    """A content hash of the base checkpoint: a moekit checkpoint's manifest.json (it holds the
    SHA-256 of every file, checked when the checkpoint was resolved), or a Hugging Face folder's
    config.json and weight files."""
    folder = Path(ref.path)
    names = ["manifest.json"] if ref.kind == "moekit" else sorted(
        p.name for p in folder.iterdir() if p.name == "config.json" or p.name.endswith((".safetensors", ".json"))
        and not p.name.startswith("tokenizer") and p.name != "special_tokens_map.json")
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_base(ref) -> nn.Module:
    """The base model in float32 (what the trainer's optimizer and checkpoints expect). A
    `moekit finetune` checkpoint is a base too: its adapted model with the adapters merged (a
    QLoRA base dequantized), so fine-tuning can be chained."""
    if ref.kind != "hf" and (Path(ref.path) / FINETUNE_JSON).is_file():
        from moekit.finetune.lora import merge_lora

        return merge_lora(load_finetuned(ref.path)).float()
    if ref.kind == "hf":
        from moekit.hf import from_hf

        return from_hf(ref.path, dtype="float32")
    from moekit.models.io import load_model

    return load_model(ref, dtype="float32")


def adapt(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The base made into the model that trains: unchanged (full), or quantized (qlora) and
    with adapters (lora, qlora), in place."""
    if cfg.method == "qlora":
        quantize_base(model, bits=cfg.qlora.bits, block=cfg.qlora.block)
    if cfg.method in ("lora", "qlora"):
        apply_lora(model, cfg.lora.spec())
    apply_routing(model, cfg.routing)
    return model.train()


def record(cfg: FinetuneConfig, ref, sha: str, data: FinetuneData) -> dict:
    """finetune.json: what `load_finetuned` needs to rebuild the model, and what it checks."""
    return {"method": cfg.method,
            "lora": cfg.lora.spec().record() if cfg.method != "full" else None,
            "qlora": dataclasses.asdict(cfg.qlora) if cfg.method == "qlora" else None,
            "routing": dataclasses.asdict(cfg.routing),
            "base": {"path": str(Path(ref.path).resolve()), "kind": ref.kind, "sha256": sha},
            "data": {"path": str(data.path.resolve()), "sha256": data.info["sha256"]}}


def peft_note(model: nn.Module, method: str) -> str | None:
    """None when the checkpoints will hold PEFT adapter files; else why not (full fine-tuning, or
    a model no transformers family expresses, such as a DeepSeek-style router on GQA attention)."""
    if method == "full":
        return "full fine-tuning: no adapter, the checkpoints hold the whole model"
    from moekit.hf.api import model_family
    from moekit.hf.common import NotRepresentable

    try:
        model_family(model)
    except NotRepresentable as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        return f"no transformers family expresses this model ({first}; ...), so no PEFT adapter files"
    return None


def _write_adapter(folder: Path, model: nn.Module, cfg: FinetuneConfig, note: str | None) -> None:
    """The PEFT-format adapter files (adapter_config.json, adapter_model.safetensors), where a
    PEFT adapter can exist (`peft_note`)."""
    if note is not None:
        return
    from moekit.finetune.peft import save_adapter

    save_adapter(model, folder)


def _check_resume(out: Path, rec: dict) -> None:
    """--resume continues the same fine-tuning: same method and settings, same base, same data."""
    newest = ck.latest(out / "checkpoints")
    if newest is None:
        return  # the trainer says there is nothing to resume
    path = newest.path / FINETUNE_JSON
    if not path.is_file():
        raise ValueError(f"--resume: {newest.path} has no {FINETUNE_JSON}: {out} is not a fine-tuning run; "
                         f"choose another --out")
    saved = json.loads(path.read_text())
    for key, what in (("method", "--method"), ("lora", "lora.* settings"), ("qlora", "qlora.* settings"),
                      ("routing", "routing.* settings")):
        default = dataclasses.asdict(RoutingSettings()) if key == "routing" else None  # runs from before routing.*
        if saved.get(key, default) != rec[key]:
            raise ValueError(f"--resume: {out} was fine-tuned with other {what} ({saved.get(key)}); use the same "
                             f"--method and --set values, or choose another --out")
    if saved["base"]["sha256"] != rec["base"]["sha256"]:
        raise ValueError(f"--resume: {out} was fine-tuned from {saved['base']['path']} with another content "
                         f"(sha256 {saved['base']['sha256'][:12]}, now {rec['base']['sha256'][:12]}); "
                         f"give the same base with --checkpoint")
    if saved["data"]["sha256"] != rec["data"]["sha256"]:
        raise ValueError(f"--resume: {out} was fine-tuned on another version of {saved['data']['path']}; "
                         f"restore that file or choose another --out")


def finetune(checkpoint: str | Path, data_path: str | Path, method: str, out: str | Path, *,
             sets: list[str] | tuple[str, ...] = (), resume: bool = False, console=None) -> dict:
    """Fine-tune the model of `checkpoint` on `data_path`; returns the report (also written to
    `out`/report.json)."""
    from moekit.tokenizer import checkpoint_tokenizer
    from moekit.train.loop import train

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    out, data_path = Path(out), Path(data_path)
    existing = ck.list_checkpoints(out / "checkpoints")
    if existing and not resume:  # before any work (the trainer refuses too, later)
        raise ValueError(f"{out / 'checkpoints'} already holds checkpoints (newest step {existing[-1][0]}); pass "
                         f"--resume to continue that run, or choose another --out")
    ref = resolve_checkpoint(checkpoint)
    tok = checkpoint_tokenizer(ref, hint="fine-tuning on text needs the checkpoint's tokenizer")
    if tok is None:
        raise ValueError(f"{ref.path} has no tokenizer (tokenizer.json + tokenizer_config.json): fine-tuning "
                         f"on text needs the one the model was trained with")
    model_cfg = _model_config(ref)
    cfg = build_config(model_cfg, data_path, method, list(sets))
    data = FinetuneData(cfg.run.data, data_path, tok, cfg.run.seed)
    vocab = getattr(model_cfg, "vocab_size", None)
    if vocab is not None and data.max_id() >= vocab:
        raise ValueError(f"{data_path}: the tokenizer of {ref.path} gives id {data.max_id()}, past the model's "
                         f"vocabulary of {vocab}: the tokenizer does not belong to this model")
    sha = base_hash(ref)
    rec = record(cfg, ref, sha, data)
    if resume:
        _check_resume(out, rec)
    base = load_base(ref)
    apply_routing(base, cfg.routing)  # checked here, before the trainer makes the run folder
    if cfg.method != "full":
        lora_sites(base, cfg.lora.spec())  # likewise the LoRA targets and expert ids
    before = base_scores(base, data, cfg.run)
    note = peft_note(base, cfg.method)
    if note is not None and console is not None and cfg.method != "full":
        console.print(f"note: {note}; the checkpoints hold moekit's own state", soft_wrap=True, markup=False)
    holder: dict[str, nn.Module] = {}

    def factory(_model_cfg):
        holder["model"] = adapt(load_base(ref), cfg)
        return holder["model"]

    def files(folder: Path, model: nn.Module) -> None:
        write_atomic(folder / FINETUNE_JSON, json.dumps(rec, indent=2))
        _write_adapter(folder, model, cfg, note)

    del base
    result = train(cfg.run, out, resume=resume, data=data, console=console, model_factory=factory,
                   checkpoint_files=files)
    model = holder["model"]
    after = {"load": expert_load(model, data, cfg.run)}
    report = build_report(cfg, rec, result, before, after, trainable_summary(model))
    report["weight_bytes"] = state_bytes(model)  # everything the model holds: float or packed, adapters too
    report["peft_adapter"] = note is None
    if note is not None:
        report["peft_adapter_note"] = note
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    return report


def _model_config(ref):
    if ref.kind == "hf":
        from moekit.hf import config_from_hf

        return config_from_hf(ref.path)
    from moekit.models.io import read_config

    return read_config(ref.path)


def load_finetuned(out_dir: str | Path) -> nn.Module:
    """The adapted model of a fine-tuning run's newest checkpoint (or of a checkpoint folder):
    the base rebuilt from its recorded path, checked against its recorded content hash,
    quantized and adapted as in training, then the checkpoint's weights loaded. In eval mode."""
    folder = resolve_checkpoint(out_dir).path
    path = folder / FINETUNE_JSON
    if not path.is_file():
        raise ValueError(f"{folder} has no {FINETUNE_JSON}: not a checkpoint of `moekit finetune`")
    rec = json.loads(path.read_text())
    base_path = Path(rec["base"]["path"])
    if not base_path.exists():
        raise ValueError(f"{folder}: the base checkpoint {base_path} is gone; put it back there (its sha256 "
                         f"starts {rec['base']['sha256'][:12]})")
    ref = resolve_checkpoint(base_path)
    if base_hash(ref) != rec["base"]["sha256"]:
        raise ValueError(f"{folder}: the base checkpoint {base_path} changed since the fine-tuning (sha256 "
                         f"{rec['base']['sha256'][:12]} then, {base_hash(ref)[:12]} now); restore it")
    cfg = FinetuneConfig(RunConfig(model=_model_config(ref)), rec["method"],
                         LoraSettings(**_settings(rec["lora"])), QloraSettings(**(rec["qlora"] or {})))
    model = adapt(load_base(ref), cfg)
    ck.load_model_weights(model, folder)
    return model.eval()


def _settings(lora: dict | None) -> dict:
    if not lora:
        return {}
    return {**lora, "targets": tuple(lora["targets"]),
            "experts": None if lora["experts"] is None else tuple(lora["experts"])}


__all__ = ["FINETUNE_JSON", "METHODS", "FinetuneConfig", "LoraSettings", "QloraSettings", "build_config",
           "finetune", "load_finetuned"]
