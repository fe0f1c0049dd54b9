"""What several commands share: the run arguments of `moekit train` and `moekit compare` (preset,
--set overrides, output), the checkpoint `--checkpoint PATH` names for the commands that read
a model (generate, chat, info, inspect, convert): one resolver and one verification for all of
them, and for the commands that run a language model (generate, chat) its tokenizer, stop
tokens, dtype and the checks made before a weight is read (context length, memory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.tokenizer import (  # noqa: F401  (the commands import them from here)
    checkpoint_eos_ids,
    checkpoint_tokenizer,
    load_checkpoint_tokenizer,
    read_checkpoint_json,
)
from moekit.train.config import RunConfig, to_dict
from moekit.train.overrides import apply_overrides

if TYPE_CHECKING:
    from moekit.models.io import CheckpointRef


def add_run_arguments(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    p.add_argument("--preset", default=default_preset,
                   help="run preset (see --list-presets); any model preset name also works"
                        + (f" (default {default_preset})" if default_preset else ""))
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 model.moe.top_k=1 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-presets", action="store_true", help="list run presets and exit")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    from moekit.train.presets import get_run_preset

    if args.preset is None:
        raise ValueError("--preset is required (see --list-presets)")
    cfg = get_run_preset(args.preset)
    return apply_overrides(cfg, [a for group in args.overrides for a in group])


def print_presets(console) -> None:
    from moekit.models import list_presets
    from moekit.train.presets import describe_presets

    for name, doc in describe_presets():
        console.print(f"[bold]{name}[/bold]  {doc}")
    console.print("model presets (default training settings): " + ", ".join(list_presets()))


def config_json(cfg: RunConfig) -> dict:
    return to_dict(cfg)


def start_run(args: argparse.Namespace) -> tuple[RunConfig, Path] | None:
    """What `train` and `compare` do first: --list-presets and --show-config print and return
    None; otherwise the resolved run config and the output folder."""
    import json

    from rich.console import Console

    if args.list_presets:
        print_presets(Console())
        return None
    cfg = resolve_config(args)
    if args.show_config:
        print(json.dumps(config_json(cfg), indent=2))
        return None
    return cfg, Path(args.out or f"runs/{args.preset}")


def training_failed(command: str, err: Exception) -> int:
    """A run that failed (not the user's input, e.g. a non-finite loss): one line, exit status 1.
    The last good checkpoint is kept."""
    print(f"moekit {command}: error: {err}", file=sys.stderr)
    return 1


CHECKPOINT_HELP = "a moekit checkpoint folder, a run folder (its newest checkpoint) or a Hugging Face folder"


def add_fallback_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fallback", action="store_true",
                   help="if a run's newest checkpoint is damaged, use the newest intact older one (and say which)")


def open_checkpoint(path: str | Path, fallback: bool = False) -> CheckpointRef:
    """Resolve and verify the checkpoint PATH means (`moekit.models.io.resolve_checkpoint`), and
    say on stderr which one is used and why when PATH is a run folder, and what was skipped."""
    from moekit.models.io import resolve_checkpoint

    ref = resolve_checkpoint(path, fallback=fallback)
    for skipped, why in ref.skipped:
        print(f"skipped {skipped}: {why}", file=sys.stderr)
    if ref.note:
        print(ref.note, file=sys.stderr)
    return ref


DTYPES = ("float32", "bfloat16", "float16")


def load_model(ref: CheckpointRef, device: str = "cpu", dtype: str | None = None, mmap: bool = False):
    """The model of a resolved checkpoint: a moekit checkpoint (verified when resolved) or a
    Hugging Face folder (every shard's header checked before a weight is read). dtype: one of
    DTYPES, or None for the checkpoint's own (a Hugging Face folder's stored dtype; float32 for
    a moekit checkpoint)."""
    if ref.kind == "hf":
        from moekit.hf import from_hf

        return from_hf(ref.path, dtype=dtype).to(device)
    if (Path(ref.path) / "finetune.json").is_file():  # a `moekit finetune` checkpoint: base + adapters
        from moekit.finetune.job import load_finetuned
        from moekit.finetune.lora import merge_lora

        model = load_finetuned(ref.path)
        if getattr(model, "quantization", None) is None:  # LoRA on a float base: fold the adapters in,
            merge_lora(model)  # so generation runs the plain fast paths (exact to float rounding)
        import torch

        model = model.to(device)  # float32, as trained; "auto" (the checkpoint's own) keeps it
        return model.to(getattr(torch, dtype)) if dtype and dtype != "auto" else model
    from moekit.models.io import load_model as load_moekit

    return load_moekit(ref, map_location=device, dtype=dtype, mmap=mmap)  # built in `dtype`, filled from the file


def read_model_config(ref: CheckpointRef):
    if ref.kind == "hf":
        from moekit.hf import config_from_hf

        return config_from_hf(ref.path)
    from moekit.models.io import read_config

    return read_config(ref.path)


# ---------------------------------------------------------------------------------------------
# Language models: tokenizer, stop tokens, checks before loading


def no_tokenizer_error(folder: Path) -> ValueError:
    from moekit.tokenizer import HF_TOKENIZER_NEEDS

    return ValueError(f"{folder} has no tokenizer: text needs {HF_TOKENIZER_NEEDS} in that folder; "
                      f"or give token ids with --prompt-ids")


def weight_dtype_bytes(ref: CheckpointRef, dtype: str | None) -> tuple[int, str]:
    """(bytes per weight, dtype name) the loaded model will hold."""
    import torch

    if dtype is None:
        dtype = "float32"
        if ref.kind == "hf":
            hf = read_checkpoint_json(ref.path, "config.json")
            stored = hf.get("dtype") or hf.get("torch_dtype")
            if stored in ("float32", "bfloat16", "float16", "float64"):
                dtype = stored
    return getattr(torch, dtype).itemsize, dtype


def check_fits(cfg, dtype_bytes: int, dtype: str, allow_large: bool, what: str, advice: str) -> None:
    """Refuse, before a byte is allocated, a model whose weights (parameter count x dtype size)
    would not fit in the memory available (more than 80% of it), unless `allow_large`."""
    from moekit.machine import available_memory
    from moekit.models import count_parameters

    need = count_parameters(cfg)[0] * dtype_bytes
    have = available_memory()
    if not allow_large and have is not None and need > 0.8 * have:
        raise ValueError(f"{what} needs {need / 2**30:.1f} GiB of {dtype} weights but {have / 2**30:.1f} GiB "
                         f"are available; {advice} or pass --allow-large")


def check_context(cfg, lengths: list[int], max_new_tokens: int) -> None:
    """Every prompt and its new tokens must fit the model's context, checked before loading."""
    ctx = getattr(cfg, "max_seq_len", None)
    if ctx is None:
        return
    for i, n in enumerate(lengths):
        if n + max_new_tokens > ctx:
            what = f"prompt {i + 1}" if len(lengths) > 1 else "the prompt"
            raise ValueError(f"{what} has {n} tokens; with --max-new-tokens {max_new_tokens} that is "
                             f"{n + max_new_tokens}, past the model's context of {ctx} tokens (max_seq_len; "
                             f"max_position_embeddings in a Hugging Face config.json): shorten the prompt or "
                             f"lower --max-new-tokens")


# ---------------------------------------------------------------------------------------------
# Output folders


def check_out_folder(out: Path, sources: list[Path], overwrite: bool, command: str) -> bool:
    """Refuse an --out that would destroy something (`moekit convert`, `moekit quantize`); True
    when an existing folder is to be replaced.

    Paths are compared resolved (symlinks followed): writing through a link into the source is
    the accident this prevents."""
    from moekit.checkfiles import OutputFolderError

    target = out.resolve()
    for src in sources:
        source = src.resolve()
        if target == source:
            where = "is the source"
        elif source in target.parents:
            where = "is inside the source"
        elif target in source.parents:
            where = "contains the source"
        else:
            continue
        raise OutputFolderError(f"--out {out} {where} {src}; {command} writes a new folder: choose one outside it")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} exists and is not a folder; choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        is_model = (out / "config.json").is_file() or (out / "manifest.json").is_file()
        if not overwrite:
            what = "a checkpoint or model folder" if is_model else "files"
            extra = ", or pass --overwrite to replace it" if is_model else ""
            raise OutputFolderError(f"--out {out} already holds {what}; choose a new or empty folder{extra}")
        if not is_model:
            raise OutputFolderError(
                f"--out {out} is not empty and holds no model (no config.json or manifest.json); --overwrite only "
                f"replaces a checkpoint or Hugging Face folder: choose a new or empty folder"
            )
        return True
    return False
