"""The upcycling experiment (examples/upcycle_decoder.py) end to end at toy size: dense run with
the trainer, both continuations, the equal starting point, and the results files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "upcycle_decoder.py"


def _module():
    spec = importlib.util.spec_from_file_location("upcycle_decoder_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_upcycling_run(tmp_path):
    demo = _module()
    rc = demo.main(["upcycle_decoder.py", "--dense-steps", "4", "--steps", "4", "--max-bytes", "1500000",
                    "--evals", "2", "--eval-batches", "1", "--batch-size", "4", "--seq-len", "64",
                    "--out-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "--quiet"])
    assert rc == 0
    r = json.loads((tmp_path / "res.json").read_text())
    dense, up = r["continue"]["dense"], r["continue"]["upcycled"]
    assert dense[0]["val_bpb"] == pytest.approx(up[0]["val_bpb"], abs=1e-4)  # copies: the same function
    assert dense[-1]["tokens"] == up[-1]["tokens"] > dense[0]["tokens"]
    assert r["params"]["upcycled"][0] > r["params"]["dense"][0]
    assert r["ffn_flops_per_token"]["upcycled"] > 1.9 * r["ffn_flops_per_token"]["dense"]  # top-2 of copies
    assert (tmp_path / "res.png").stat().st_size > 0 and "dense - upcycled" in (tmp_path / "res.md").read_text()
