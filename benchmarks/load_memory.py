"""Peak memory while loading a checkpoint, as a multiple of the model's weight bytes.

Builds one MoE decoder (about 200 MB of float32 weights by default), saves it as a moekit
checkpoint and as a Hugging Face (Mixtral) folder, then loads each in a fresh process and reads
the process's peak resident memory: the process first loads a tiny checkpoint of the same kind
(so imports and one-time set-up do not count), the kernel's high-water mark is reset just before
the load (`/proc/self/clear_refs`), and the growth is divided by the bytes of the loaded model's
tensors. Rows:

    moekit            models.io.load_checkpoint (read straight into the model's tensors)
    moekit mmap       the same with mmap=True (tensors are views of the file; pages come in when
                      first read, so the load itself makes almost nothing resident)
    hf                moekit.hf.from_hf
    moekit int8/4-bit the same checkpoint quantized (`moekit quantize`: experts, attention, head)
    load_file (old)   what moekit did before: safetensors.torch.load_file, then load_state_dict
                      into a randomly initialised model

    python benchmarks/load_memory.py                 # writes docs/results/load_memory.json
    python benchmarks/load_memory.py --results none  # print only

Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_load(load) -> dict:
    """Run `load()` (returning a model) and report the peak resident growth it caused."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS")
    model = load()
    peak = _status("VmHWM")
    seen, weight_bytes = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            weight_bytes += t.untyped_storage().nbytes()
    return {"weight_bytes": weight_bytes, "rss_before": before, "peak": peak,
            "peak_growth": peak - before, "ratio": (peak - before) / weight_bytes}


def peak_in_fresh_process(kind: str, path, dtype: str = "float32") -> dict:
    """measure_load of one load (`kind` as in the table above) in a new Python process."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(kind: str, path: str, dtype: str) -> dict:
    import torch

    td = None if dtype == "float32" else getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as warm:  # one-time costs (lazy imports) before the reset
        small_ck, small_hf = build_checkpoints(Path(warm), d_model=16, d_ff=32, experts=2, layers=1, vocab=64)
        _load(kind, str(small_hf if kind == "hf" else small_ck), td)
    return measure_load(lambda: _load(kind, path, td))


def _load(kind: str, path: str, td):
    import torch

    from moekit.models.io import load_checkpoint, read_config

    if kind in ("moekit", "moekit int8", "moekit 4-bit"):
        return load_checkpoint(path, dtype=td)
    if kind == "moekit mmap":
        return load_checkpoint(path, dtype=td, mmap=True)
    if kind == "hf":
        from moekit.hf import from_hf

        return from_hf(path, dtype=td or torch.float32)
    if kind == "load_file (old)":
        from safetensors.torch import load_file

        from moekit.models import build_model

        def old():
            model = build_model(read_config(path))
            model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
            return model.to(td or torch.float32)

        return old()
    raise ValueError(kind)


def build_checkpoints(
    work: Path, d_model: int, d_ff: int, experts: int, layers: int, vocab: int = 4096
) -> tuple[Path, Path]:
    import torch

    from moekit.hf import to_hf
    from moekit.layers import MoEConfig
    from moekit.models import DecoderConfig, build_model
    from moekit.models.io import save_model_checkpoint

    cfg = DecoderConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=8, n_kv_heads=4, d_ff=d_ff,
                        moe=MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=2))
    torch.manual_seed(0)
    model = build_model(cfg)
    ck = save_model_checkpoint(model, work / "moekit")
    hf = to_hf(model, work / "hf", model_type="mixtral")
    return ck, hf


def quantized_checkpoint(ck: Path, bits: int, out: Path) -> Path:
    from moekit.models.io import load_checkpoint, save_model_checkpoint
    from moekit.models.quantize import quantize_model

    model = quantize_model(load_checkpoint(ck), bits=bits, block=32, targets=("experts", "attention", "head"))
    return save_model_checkpoint(model, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--results", default=str(ROOT / "docs/results/load_memory.json"),
                   help="JSON file to write, or 'none'")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ck, hf = build_checkpoints(Path(tmp), args.d_model, args.d_ff, args.experts, args.layers)
        q8, q4 = (quantized_checkpoint(ck, bits, Path(tmp) / f"q{bits}") for bits in (8, 4))
        cases = [("moekit", ck, "float32"), ("moekit", ck, "bfloat16"), ("moekit mmap", ck, "float32"),
                 ("moekit int8", q8, "float32"), ("moekit 4-bit", q4, "float32"),
                 ("hf", hf, "float32"), ("hf", hf, "bfloat16"), ("load_file (old)", ck, "float32")]
        print(f"{'loader':<18} {'dtype':<9} {'weights MiB':>12} {'peak growth MiB':>16} {'x weights':>10}")
        for kind, path, dtype in cases:
            r = {"loader": kind, "dtype": dtype, **peak_in_fresh_process(kind, path, dtype)}
            rows.append(r)
            print(f"{kind:<18} {dtype:<9} {r['weight_bytes'] / 2**20:>12.1f} {r['peak_growth'] / 2**20:>16.1f} "
                  f"{r['ratio']:>10.3f}")
    if args.results != "none":
        import torch

        doc = {
            "command": "python benchmarks/load_memory.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            "model": {"d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts, "layers": args.layers},
            "rows": rows,
        }
        path = Path(args.results)
        tmp_path = path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp_path, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
