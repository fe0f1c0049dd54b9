"""`moekit generate`: continue prompts with a decoder LM from a checkpoint or a preset.

    moekit generate --checkpoint runs/x --prompt "def main(" --max-new-tokens 64 --temperature 0.8
    moekit generate --preset tiny --seed 0 --prompt "hello" --prompt "a longer prompt"

`--checkpoint` takes a checkpoint folder (config.json + model.safetensors + manifest.json,
tokenizer.json if the trainer saved one), a run folder, whose newest `checkpoints/step-*` is used
(stderr says which; a damaged newest one is an error unless `--fallback`), or a Hugging Face
folder. The checkpoint is verified against its manifest before a weight is used, and a
checkpoint without weights is an error. Only a preset gets random weights, from `--seed` (useful
to try the machinery, not to read the text). Prompts are encoded with the checkpoint's
tokenizer, bytes otherwise; several prompts run as one left-padded batch.
"""

from __future__ import annotations

import argparse
import json

import torch

from moekit.cli.common import (
    CHECKPOINT_HELP,
    add_fallback_argument,
    load_checkpoint_tokenizer,
    load_model,
    open_checkpoint,
)
from moekit.machine import available_memory
from moekit.tokenizer import ByteTokenizer

HELP = "generate text with a decoder LM (KV cache, greedy / temperature / top-k / top-p sampling)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    src.add_argument("--preset", metavar="NAME", help="model preset with random weights (see `moekit info --list`)")
    add_fallback_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling (default 0)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for a batch")
    p.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help="prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", type=int, action="append", default=[], metavar="ID", help="stop token id (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    p.add_argument("--allow-large", action="store_true", help="build a preset even if it looks too big for memory")


def _check_fits(cfg, allow_large: bool) -> None:
    """Refuse to allocate a published-size preset (Mixtral: 187 GB in float32) by accident."""
    from moekit.models import count_parameters

    need = count_parameters(cfg)[0] * 4
    have = available_memory()
    if not allow_large and have is not None and need > 0.8 * have:
        raise ValueError(
            f"preset {cfg.preset!r} needs {need / 2**30:.1f} GiB of float32 weights but {have / 2**30:.1f} GiB "
            f"are available; pick a small preset (tiny, small) or pass --allow-large"
        )


class _PresetBytes(ByteTokenizer):
    """Bytes for a preset's random weights. A published-size preset's vocabulary is larger than 256
    (mistral-7b: 32000), so generated ids past the byte range are skipped rather than decoded."""

    def decode(self, ids) -> str:
        return super().decode(i for i in ids if 0 <= int(i) < 256)


def run(args: argparse.Namespace) -> int:
    from moekit.models import DecoderLM, build_model, get_preset

    torch.manual_seed(args.seed)
    if args.checkpoint:
        ref = open_checkpoint(args.checkpoint, fallback=args.fallback)
        model = load_model(ref, args.device)
        tok = load_checkpoint_tokenizer(ref.path)
    else:
        cfg = get_preset(args.preset)
        _check_fits(cfg, args.allow_large)
        model = build_model(cfg).to(args.device)
        tok = _PresetBytes()
    if not isinstance(model, DecoderLM):
        source = "checkpoint" if args.checkpoint else "preset"
        raise ValueError(f"generate needs a decoder LM; the {source} is a {type(model).__name__}")
    vocab = model.cfg.vocab_size
    prompts: list[list[int]] = []
    for text in args.prompt or []:
        prompts.append([int(i) for i in tok.encode(text.encode("utf-8"))])
    for ids in args.prompt_ids or []:
        prompts.append([int(s) for s in ids.split(",") if s.strip()])
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    for p in prompts:
        bad = [i for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (vocab_size={vocab}); "
                             f"use --prompt-ids for a model without a byte tokenizer")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(
        prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_tokens=args.stop, use_cache=not args.no_cache, generator=generator,
    )
    width = max(len(p) for p in prompts)
    results = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        if args.stop:
            cut = next((j for j, t in enumerate(new) if t in args.stop), None)
            new = new if cut is None else new[: cut + 1]
        results.append({"prompt_ids": p, "new_ids": new, "text": tok.decode(p + new)})
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(r["text"])
            print("-" * 40)
    return 0
