"""Quality of int8 and 4-bit weights: bits per byte on held-out text, weight bytes and peak load
memory, float32 against `moekit quantize`'s formats, for trained checkpoints.

Held-out text: the Python standard library's test files (`Lib/test/...`, files named test_*),
which the trainer's corpus excludes (data.exclude_tests=true) and no validation pass reads, so
neither training nor any choice made here saw them. The first --bytes bytes of their sorted
concatenation are cut into windows of the length the model was trained on (the run's
data.seq_len; the model's max_seq_len when no run.json is found), with no overlap, and every
byte is scored once. Nothing is tuned: the block size (32) and the targets are fixed in advance.

For every checkpoint and format, the script loads the float32 model, quantizes it in memory
(`quantize_model`), scores it, saves it as a checkpoint, and loads that checkpoint back in a
fresh process to read the peak memory of the load (see benchmarks/load_memory.py); the loaded
model's score is checked to equal the in-memory one.

    python benchmarks/quant_quality.py --checkpoint moe=runs/compare/moe \\
        --checkpoint upcycled=runs/upcycle/continue-upcycled     # docs/results/quant_quality.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load_memory import peak_in_fresh_process  # noqa: E402  (the sibling script's measurement)

FORMATS = (("float32", None), ("int8", 8), ("4-bit", 4))


def held_out_text(num_bytes: int) -> bytes:
    from moekit.train.data import is_test_path, stdlib_root

    root = stdlib_root()
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or not is_test_path(rel):
            continue
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    return b"".join(out)[:num_bytes]


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: bytes, L: int, batch: int = 16) -> tuple[float, int]:
    """(bits per byte, bytes scored) of `text` under `model`, in windows of L tokens."""
    from moekit.train.steps import lm_loss_sum

    ids, _ = tokenizer.encode_with_offsets(text)
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = (len(ids) - 1) // L
    x = ids[: n * L].view(n, L)
    y = ids[1 : n * L + 1].view(n, L)
    token_bytes = torch.as_tensor(tokenizer.token_bytes())
    model.eval()
    nats, nbytes = 0.0, 0
    for i in range(0, n, batch):
        nats += float(lm_loss_sum(model(x[i : i + batch]).logits, y[i : i + batch]))
        nbytes += int(token_bytes[y[i : i + batch]].sum())
    return nats / math.log(2) / nbytes, nbytes


def measure(name: str, checkpoint: Path, text: bytes, work: Path) -> list[dict]:
    from moekit.models.io import load_checkpoint, resolve_checkpoint, save_model_checkpoint
    from moekit.models.quantize import available_targets, quantize_model, state_bytes
    from moekit.tokenizer import load_tokenizer

    ref = resolve_checkpoint(checkpoint)
    tokenizer = load_tokenizer(ref.path)
    L = _trained_length(ref.path)
    rows = []
    for label, bits in FORMATS:
        model = load_checkpoint(ref.path)
        targets = available_targets(model)
        if bits is not None:
            model = quantize_model(model, bits=bits, block=32, targets=targets)
        bpb, nbytes = bits_per_byte(model, tokenizer, text, L or model.cfg.max_seq_len)
        saved = save_model_checkpoint(model, work / f"{name}-{label}")
        again = load_checkpoint(saved)
        bpb_again, _ = bits_per_byte(again, tokenizer, text, L or model.cfg.max_seq_len)
        if bpb_again != bpb:
            raise SystemExit(f"{name} {label}: the saved checkpoint scores {bpb_again}, in memory {bpb}")
        peak = peak_in_fresh_process("moekit", saved)
        rows.append({
            "model": name, "checkpoint": str(ref.path), "format": label, "bits": bits, "block": 32 if bits else None,
            "targets": targets if bits else [], "window": L or model.cfg.max_seq_len, "bits_per_byte": bpb,
            "bytes_scored": nbytes,
            "weight_bytes": state_bytes(again), "file_bytes": (saved / "model.safetensors").stat().st_size,
            "load_peak_bytes": peak["peak_growth"],
        })
    base = rows[0]["bits_per_byte"]
    for r in rows:
        r["increase_pct"] = 100.0 * (r["bits_per_byte"] - base) / base
    return rows


def _trained_length(checkpoint: Path) -> int | None:
    """data.seq_len of the run a checkpoint belongs to (RUN/checkpoints/step-N or RUN itself)."""
    for folder in (checkpoint, *list(checkpoint.parents)[:2]):
        run = folder / "run.json"
        if run.is_file():
            return json.loads(run.read_text())["config"]["data"]["seq_len"]
    return None


def write_markdown(doc: dict, path: Path) -> None:
    lines = [
        "# Quantized weights: quality, bytes and load memory (results)",
        "",
        f"Generated by `{doc['command']}` on {doc['date'][:10]} ({doc['machine']['cpu']}, torch "
        f"{doc['machine']['torch']}). Raw numbers: `{path.with_suffix('.json').name}`.",
        "",
        f"Held-out text: the first {doc['held_out_bytes']:,} bytes of the standard library's test files "
        "(excluded from training and validation). Block 32, weight-only, symmetric; targets: every quantizable "
        "module the model has.",
        "",
        "| model | format | bits/byte | increase | weight MB | file MB | peak load MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        inc = "" if r["bits"] is None else f"{r['increase_pct']:+.2f}%"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['bits_per_byte']:.4f} | {inc} | {r['weight_bytes'] / 1e6:.2f} | "
            f"{r['file_bytes'] / 1e6:.2f} | {r['load_peak_bytes'] / 1e6:.2f} |"
        )
    lines += [
        "",
        "Peak load MB: the resident growth while a fresh process loads the saved checkpoint (see "
        "`benchmarks/load_memory.py`). Models this small are within the heap's own slack, so that column "
        "only shows nothing large is copied; `docs/results/load_memory.json` measures it on a 220 MB model.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a trained checkpoint or run folder to measure (repeatable)")
    p.add_argument("--bytes", type=int, default=1_000_000, help="bytes of held-out text (default 1,000,000)")
    p.add_argument("--results", default=str(ROOT / "docs/results/quant_quality"),
                   help="path stem for .json and .md, or 'none'")
    args = p.parse_args()
    from moekit.machine import cpu_name

    torch.manual_seed(0)
    text = held_out_text(args.bytes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.checkpoint:
            name, sep, path = item.partition("=")
            if not sep:
                p.error(f"--checkpoint {item!r}: give NAME=PATH")
            for r in measure(name, Path(path), text, Path(tmp)):
                rows.append(r)
                inc = "" if r["bits"] is None else f"{r['increase_pct']:+.2f}%"
                print(f"{name:<10} {r['format']:<8} {r['bits_per_byte']:.4f} bpb {inc:>8}  "
                      f"{r['weight_bytes'] / 1e6:7.2f} MB weights  {r['load_peak_bytes'] / 1e6:7.2f} MB peak load",
                      flush=True)
    if args.results != "none":
        doc = {
            "command": "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count()},
            "held_out_bytes": len(text), "rows": rows,
        }
        stem = Path(args.results)
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        write_markdown(doc, stem.with_suffix(".md"))
        print(f"wrote {stem.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
