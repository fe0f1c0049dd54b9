"""`moekit convert`: Hugging Face folders <-> moekit checkpoints.

    moekit convert --from-hf HF_DIR --out CKPT_DIR [--dtype bfloat16] [--verify]
    moekit convert --to-hf CKPT_DIR --out HF_DIR [--model-type mixtral] [--max-shard-size 5GB] [--verify]

A moekit checkpoint is what `moekit.models.save_model_checkpoint` writes (config.json +
model.safetensors + manifest.json); the conversion records the source family, dtype and
special-token ids in it, so a round trip writes the same config.json fields back. Tokenizer files
travel along both ways (so `moekit generate --checkpoint CKPT_DIR` uses the model's own
tokenizer). `--verify` loads the result beside the source with transformers and prints the
largest logit difference.

Nothing is lost: `--out` must be a new or empty folder, never the source, a folder inside it or
one that contains it. `--overwrite` replaces an existing model folder (one with config.json or
manifest.json: a checkpoint or a Hugging Face folder), still never the source. The result is
written to a temporary folder beside `--out` and renamed into place at the end, so a failure
leaves `--out` as it was. `--to-hf` reads its checkpoint like every command that reads a model
(a run folder means its newest checkpoint, verified against its manifest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from moekit.cli.common import add_fallback_argument, check_out_folder

HELP = "convert Hugging Face checkpoints (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, Llama, Qwen2) to and from moekit"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
VERIFY_TOL = 1e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face folder to read (config.json + safetensors)")
    src.add_argument("--to-hf", metavar="PATH",
                     help="moekit checkpoint (or run folder: its newest checkpoint) to write as a Hugging Face folder")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder to write: new or empty (written to a temporary folder, then renamed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an existing model folder (a checkpoint or Hugging Face folder); "
                        "never the source")
    add_fallback_argument(p)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default auto: as the source stores them)")
    p.add_argument("--model-type", default=None,
                   help="with --to-hf: the family to write (default: the source's, else the one that fits)")
    p.add_argument("--max-shard-size", default="5GB", help="with --to-hf: largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits with transformers on random tokens (needs transformers)")


def _tokenizer_files(src: Path) -> dict[str, Path]:
    return {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}


def _check_out(out: Path, sources: list[Path], overwrite: bool) -> bool:
    return check_out_folder(out, sources, overwrite, "convert")


def _summary(model) -> str:
    from moekit.models import count_parameters

    cfg = model.cfg
    total, active = count_parameters(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    parts = [f"{cfg.n_layers} layers"]
    moe = getattr(cfg, "moe", None)
    if moe is not None:
        moe_layers = getattr(cfg, "moe_layers", None)
        count = f"{len(moe_layers)} MoE x " if moe_layers is not None else ""
        parts.append(f"{count}{moe.num_experts} experts top-{moe.top_k}"
                     + (f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else ""))
    if hasattr(cfg, "attention"):
        parts.append(f"{cfg.attention} attention")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling:
        parts.append(f"rope {scaling['type']} x{scaling['factor']:g}")
    return f"{', '.join(parts)}; {total / 1e6:.2f} M parameters ({active / 1e6:.2f} M active per token), {dtype}"


def _verify(ours, hf_dir: Path) -> float:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("--verify needs transformers (pip install 'moekit[hf]')") from None
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                               experts_implementation="eager").eval()
    ours = ours.float().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, min(16, ours.cfg.max_seq_len)), generator=g)
    with torch.no_grad():
        diff = (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item()
    print(f"verify: max |logit diff| vs transformers {type(ref).__name__} = {diff:.3g} "
          f"on {ids.shape[0]}x{ids.shape[1]} random tokens (float32)")
    return diff


def run(args: argparse.Namespace) -> int:
    from moekit.checkfiles import CheckpointError, atomic_folder, read_json
    from moekit.cli.common import load_model, open_checkpoint
    from moekit.hf import from_hf, to_hf
    from moekit.models import load_checkpoint, save_model_checkpoint

    out = Path(args.out)
    start = time.perf_counter()
    dtype = None if args.dtype == "auto" else args.dtype
    if args.from_hf:
        src = Path(args.from_hf)
        replace = _check_out(out, [src], args.overwrite)  # before reading gigabytes
        model = from_hf(src, dtype=dtype)
        print(f"loaded {model.hf_source['model_type']} from {src}: {_summary(model)}")
        tokenizer = _tokenizer_files(src)
        save_model_checkpoint(model, out, extra={"hf_source": model.hf_source}, files=tokenizer, overwrite=replace)
        files = ["config.json", "model.safetensors", *tokenizer, "manifest.json"]
        print(f"wrote moekit checkpoint {out} ({', '.join(files)}) in {time.perf_counter() - start:.1f}s")
        if args.verify:
            reloaded = load_checkpoint(out)
            return 0 if _verify(reloaded, src) <= VERIFY_TOL else 1
        return 0

    given = Path(args.to_hf)
    _check_out(out, [given], args.overwrite)  # before hashing gigabytes
    ref = open_checkpoint(given, fallback=args.fallback)
    src = ref.path
    if ref.kind == "hf":
        raise CheckpointError(f"--to-hf {given} is a Hugging Face folder already; --to-hf takes a moekit checkpoint")
    replace = _check_out(out, [src], args.overwrite)  # the checkpoint a run folder resolved to
    model = load_model(ref)
    meta = read_json(src / "config.json")
    source = meta.get("hf_source") if isinstance(meta.get("hf_source"), dict) else {}
    model.hf_source = source
    if dtype is None:
        dtype = source.get("dtype")  # the dtype it was converted from; else as loaded (float32)
    tokenizer = _tokenizer_files(src)
    with atomic_folder(out, replace=replace) as tmp:
        to_hf(model, tmp, max_shard_size=args.max_shard_size, model_type=args.model_type, dtype=dtype)
        for name, path in tokenizer.items():
            shutil.copyfile(path, tmp / name)
        hf_cfg = json.loads((tmp / "config.json").read_text())
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
    print(f"loaded moekit checkpoint {src}: {_summary(model)}")
    print(f"wrote {hf_cfg['model_type']} ({hf_cfg['architectures'][0]}, {hf_cfg['torch_dtype']}) to {out}: "
          f"config.json, {len(shards)} safetensors file(s){', ' + ', '.join(tokenizer) if tokenizer else ''} "
          f"in {time.perf_counter() - start:.1f}s")
    if args.verify:
        # Written in another dtype, the folder is checked as written: moekit and transformers
        # reading the same files must agree.
        cast = dtype is not None and getattr(torch, dtype) != model.embed.weight.dtype
        check = from_hf(out, dtype=torch.float32) if cast else model
        return 0 if _verify(check, out) <= VERIFY_TOL else 1
    return 0
