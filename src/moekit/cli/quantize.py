"""`moekit quantize`: weight-only int8 / 4-bit quantization of a checkpoint (docs/quantization.md).

    moekit quantize --checkpoint PATH --bits 8|4 --out DIR [--block 32] [--targets experts,attention]

PATH is a moekit checkpoint, a run folder (its newest checkpoint) or a Hugging Face folder; the
result is always a moekit checkpoint (config.json with a "quantization" entry, the packed
integers and scales in model.safetensors, the tokenizer files copied along, manifest.json), which
`moekit generate --checkpoint DIR` and `moekit.models.io.load_checkpoint(DIR)` load as it is.
`--out` follows the rules of `moekit convert`: a new or empty folder, never the source;
`--overwrite` replaces an existing model folder; written to a temporary folder and renamed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moekit.cli.common import CHECKPOINT_HELP, add_fallback_argument, check_out_folder

HELP = "quantize a checkpoint's weights to int8 or 4 bits (experts, shared experts, attention, head)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.models.quantize import TARGETS

    p.add_argument("--checkpoint", metavar="PATH", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--bits", type=int, required=True, help="8 (int8) or 4 (two values per byte)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder to write: new or empty (written to a temporary folder, then renamed)")
    p.add_argument("--block", type=int, default=32, help="values per scale along the input dim (default 32)")
    p.add_argument("--targets", default="experts",
                   help=f"comma-separated, among {','.join(TARGETS)} (default experts)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an existing model folder; never the source")
    add_fallback_argument(p)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    from moekit.cli.common import load_model, open_checkpoint, read_checkpoint_json
    from moekit.cli.convert import TOKENIZER_FILES
    from moekit.models.io import save_model_checkpoint
    from moekit.models.quantize import QuantSpec, quantize_model, state_bytes

    spec = QuantSpec(args.bits, args.block, args.targets)  # bad --bits / --block / --targets: exit 2 here
    out, given = Path(args.out), Path(args.checkpoint)
    start = time.perf_counter()
    check_out_folder(out, [given], args.overwrite, "quantize")  # before reading gigabytes
    ref = open_checkpoint(given, fallback=args.fallback)
    replace = check_out_folder(out, [ref.path], args.overwrite, "quantize")  # the checkpoint a run folder means
    model = load_model(ref, dtype="auto")  # the stored dtypes: unquantized parts keep their size
    before = state_bytes(model)
    quantize_model(model, spec.bits, spec.block, spec.targets)
    after = state_bytes(model)
    extra = {}
    if ref.kind == "hf":
        extra["hf_source"] = model.hf_source
    else:  # what the source's config.json keeps beside the model config (hf_source, ...) travels along
        meta = read_checkpoint_json(ref.path, "config.json")
        if isinstance(meta.get("model"), dict):
            extra = {k: v for k, v in meta.items() if k not in ("model", "quantization")}
    files = {name: ref.path / name for name in TOKENIZER_FILES if (ref.path / name).is_file()}
    save_model_checkpoint(model, out, extra=extra or None, files=files, overwrite=replace)
    kind = "int8" if spec.bits == 8 else "4-bit"
    print(f"quantized {','.join(spec.targets)} of {ref.path} to {kind} (block {spec.block}): "
          f"{_mb(before)} -> {_mb(after)} ({after / before:.1%}); wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
