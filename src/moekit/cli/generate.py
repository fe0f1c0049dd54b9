"""`moekit generate`: continue prompts with a decoder LM from a checkpoint or a preset.

    moekit generate --checkpoint runs/x --prompt "def main(" --max-new-tokens 64 --temperature 0.8
    moekit generate --checkpoint hf-folder --chat --prompt "What is an expert?" --dtype bfloat16
    moekit generate --preset tiny --seed 0 --prompt "hello" --prompt "a longer prompt"

`--checkpoint` takes a checkpoint folder (config.json + model.safetensors + manifest.json,
tokenizer.json if the trainer saved one), a run folder, whose newest `checkpoints/step-*` is used
(stderr says which; a damaged newest one is an error unless `--fallback`), or a Hugging Face
folder. The checkpoint is verified against its manifest before a weight is used, and a
checkpoint without weights is an error. Only a preset gets random weights, from `--seed` (useful
to try the machinery, not to read the text).

Prompts are encoded with the checkpoint's tokenizer: a Hugging Face folder's own (tokenizer.json
+ tokenizer_config.json, through transformers: its bos token, its eos token(s) as the default
stop tokens, its chat template with `--chat`), a moekit checkpoint's byte or BPE tokenizer, or
bytes. A Hugging Face folder without a tokenizer takes `--prompt-ids` only. Several prompts run as
one left-padded batch. Before any weight is read, each prompt plus `--max-new-tokens` must fit the
model's context, and the weights (parameters x dtype size) must fit in memory (`--allow-large`
overrides). The ids always come back; the text wherever the tokenizer can decode them.
"""

from __future__ import annotations

import argparse
import json

import torch

from moekit.cli.common import (
    CHECKPOINT_HELP,
    DTYPES,
    add_fallback_argument,
    check_context,
    check_fits,
    checkpoint_eos_ids,
    checkpoint_tokenizer,
    load_model,
    no_tokenizer_error,
    open_checkpoint,
    read_checkpoint_json,
    read_model_config,
    weight_dtype_bytes,
)
from moekit.tokenizer import ByteTokenizer

HELP = "generate text with a decoder LM (KV cache, greedy / temperature / top-k / top-p sampling)"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What `generate` and `chat` share: the model, its dtype and device, sampling and stopping."""
    add_fallback_argument(p)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype (default: a Hugging Face folder's stored one; float32 for moekit checkpoints)")
    p.add_argument("--bits", type=int, default=None, metavar="8|4",
                   help="quantize the weights after loading (moekit-q/1, block 32): the float weights are read "
                        "first, so this saves memory while generating, not while loading; `moekit quantize` "
                        "writes a checkpoint that loads quantized")
    p.add_argument("--quant-targets", default="experts", metavar="LIST",
                   help="with --bits: comma-separated, of experts, shared_experts, dense_ffn, attention, head "
                        "(default experts)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", type=int, action="append", default=[], metavar="ID",
                   help="stop token id (repeatable; default: the checkpoint's eos_token_id)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the checkpoint's eos token(s)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for the chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--allow-large", action="store_true",
                   help="load or build the model even if its weights look too big for memory")
    p.add_argument("--mmap", action="store_true",
                   help="moekit checkpoints on the CPU: weights stored in the wanted dtype become copy-on-write "
                        "views of the file (nothing copied at load; last-bit rounding may differ, see "
                        "docs/inference.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    src.add_argument("--preset", metavar="NAME", help="model preset with random weights (see `moekit info --list`)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for a batch")
    p.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help="prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--chat", action="store_true",
                   help="wrap each --prompt as a user message in the tokenizer's chat template (with the "
                        "assistant's turn opened, as apply_chat_template(add_generation_prompt=True))")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print token ids and text as JSON")


class _PresetBytes(ByteTokenizer):
    """Bytes for a preset's random weights. A published-size preset's vocabulary is larger than 256
    (mistral-7b: 32000), so generated ids past the byte range are skipped rather than decoded."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return super().decode(i for i in ids if 0 <= int(i) < 256)


def open_lm(args: argparse.Namespace):
    """(checkpoint ref, model config, tokenizer or None, default stop ids) of --checkpoint, read
    from its files only: no weight is loaded yet."""
    ref = open_checkpoint(args.checkpoint, fallback=args.fallback)
    cfg = read_model_config(ref)
    tok = checkpoint_tokenizer(ref)
    eos = list(getattr(tok, "eos_token_ids", ())) or checkpoint_eos_ids(ref.path)
    return ref, cfg, tok, eos


def stop_ids(args: argparse.Namespace, eos: list[int]) -> list[int]:
    return list(args.stop) or ([] if args.ignore_eos else eos)


def load_lm(args: argparse.Namespace, ref, cfg):
    """The model of `ref`, once its weights were found to fit in memory."""
    from moekit.models import DecoderLM

    size, name = weight_dtype_bytes(ref, args.dtype)
    check_fits(cfg, size, name, args.allow_large, f"checkpoint {ref.path}",
               "pick a smaller dtype (--dtype bfloat16)" if size > 2 else "use a machine with more memory")
    check_quant_targets(args, ref, cfg)
    if args.mmap and ref.kind != "moekit":
        raise ValueError(f"--mmap: {ref.path} is a Hugging Face folder, whose experts are restacked on load; "
                         f"`moekit convert --from-hf` it once to map it")
    model = load_model(ref, args.device, args.dtype, mmap=args.mmap)
    if not isinstance(model, DecoderLM):
        raise ValueError(f"this command needs a decoder LM; the checkpoint is a {type(model).__name__}")
    return quantize_if_asked(args, model)


def check_quant_args(args: argparse.Namespace) -> None:
    """--bits and --quant-targets, checked before anything is loaded."""
    from moekit.models.quantize import QuantSpec

    if args.bits is not None:
        QuantSpec(args.bits, 32, args.quant_targets)


def check_quant_targets(args: argparse.Namespace, ref, cfg) -> None:
    """--bits on a quantized checkpoint, or a --quant-targets entry the model lacks: refused before
    a weight is read (the structure comes from a model built on the meta device)."""
    if args.bits is None:
        return
    from moekit.models import build_model
    from moekit.models.quantize import QuantSpec, available_targets

    if ref.kind == "moekit" and "quantization" in read_checkpoint_json(ref.path, "config.json"):
        raise ValueError("--bits: this checkpoint is quantized already; drop --bits")
    with torch.device("meta"):
        have = available_targets(build_model(cfg))
    missing = [t for t in QuantSpec(args.bits, 32, args.quant_targets).targets if t not in have]
    if missing:
        raise ValueError(f"--quant-targets: this model has no {', '.join(missing)} to quantize; "
                         f"it has: {', '.join(have) or 'nothing quantizable'}")


def quantize_if_asked(args: argparse.Namespace, model):
    if args.bits is None:
        return model
    from moekit.models.quantize import quantize_model

    return quantize_model(model, bits=args.bits, block=32, targets=args.quant_targets)


def chat_messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def _encode(args, tok, folder) -> list[list[int]]:
    prompts: list[list[int]] = []
    if args.prompt and tok is None:
        raise no_tokenizer_error(folder)
    if args.chat and not args.prompt:
        raise ValueError("--chat wraps --prompt text in the chat template; give --prompt (--prompt-ids are "
                         "used as they are)")
    if args.system is not None and not args.chat:
        raise ValueError("--system is a chat template's system message: give it with --chat")
    for text in args.prompt or []:
        if args.chat:
            if not hasattr(tok, "apply_chat_template"):
                raise ValueError(f"--chat needs a Hugging Face tokenizer with a chat template; {folder or 'a preset'} "
                                 f"has a {tok.kind} tokenizer")
            prompts.append(tok.apply_chat_template(chat_messages(text, args.system)))
        elif hasattr(tok, "encode_text"):
            prompts.append(tok.encode_text(text))
        else:
            prompts.append([int(i) for i in tok.encode(text.encode("utf-8"))])
    for ids in args.prompt_ids or []:
        try:
            prompts.append([int(s) for s in ids.split(",") if s.strip()])
        except ValueError:
            raise ValueError(f"--prompt-ids {ids!r}: give comma-separated integer token ids") from None
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return prompts


def _decoded(tok, ids: list[int], skip_special_tokens: bool = False) -> tuple[str | None, str | None]:
    """(text, note): the text when the tokenizer knows every id, else None and why."""
    if tok is None:
        return None, "no text: the checkpoint has no tokenizer"
    if not isinstance(tok, _PresetBytes):
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            return None, (f"no text: ids {bad[:5]} are outside the tokenizer's vocabulary "
                          f"({tok.vocab_size} tokens)")
    return tok.decode(ids, skip_special_tokens=skip_special_tokens), None


def run(args: argparse.Namespace) -> int:
    from moekit.models import build_model, get_preset

    torch.manual_seed(args.seed)
    check_quant_args(args)
    if args.checkpoint:
        ref, cfg, tok, eos = open_lm(args)
        prompts = _encode(args, tok, ref.path)
    else:
        cfg = get_preset(args.preset)
        ref, tok, eos = None, _PresetBytes(), []
        prompts = _encode(args, tok, None)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    vocab = getattr(cfg, "vocab_size", None)
    for p in prompts:
        bad = [i for i in p if vocab is not None and not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (vocab_size={vocab}); "
                             f"use --prompt-ids for a model without a byte tokenizer")
    check_context(cfg, [len(p) for p in prompts], args.max_new_tokens)
    if ref is not None:
        model = load_lm(args, ref, cfg)
    else:
        dtype = args.dtype or "float32"
        check_fits(cfg, getattr(torch, dtype).itemsize, dtype, args.allow_large, f"preset {cfg.preset!r}",
                   "pick a small preset (tiny, small)")
        if args.mmap:
            raise ValueError("--mmap maps a checkpoint's weights; a preset has none")
        model = build_model(cfg).to(args.device)
        if args.dtype:
            model = model.to(getattr(torch, args.dtype))
        model = quantize_if_asked(args, model)
    from moekit.models import DecoderLM

    if not isinstance(model, DecoderLM):
        raise ValueError(f"generate needs a decoder LM; the preset is a {type(model).__name__}")
    stops = stop_ids(args, eos)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(
        prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_tokens=stops, use_cache=not args.no_cache, generator=generator,
    )
    width = max(len(p) for p in prompts)
    results = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        if stops:
            cut = next((j for j, t in enumerate(new) if t in stops), None)
            new = new if cut is None else new[: cut + 1]
        text, note = _decoded(tok, p + new)
        new_text, _ = _decoded(tok, new, skip_special_tokens=True)
        r = {"prompt_ids": p, "new_ids": new, "text": text, "new_text": new_text}
        if note:
            r["note"] = note
        results.append(r)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(r["text"] if r["text"] is not None else f"({r['note']})")
            print(f"ids: {','.join(map(str, r['prompt_ids']))} | {','.join(map(str, r['new_ids']))}")
            print("-" * 40)
    return 0
