"""The benchmark's byte accounting: the all-to-all bytes it measures equal the count derived from
the routing (the cost model's check in docs/scaling.md), and the extrapolation model's arithmetic."""

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ep.py"


def _bench():
    # A plain import (not from a file spec) so the spawned benchmark workers can import it too.
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))
    return importlib.import_module("bench_ep")


@pytest.mark.distributed
def test_measured_bytes_equal_routing_count():
    bench = _bench()
    conf = {"tokens_per_rank": 24, "d_model": 8, "d_ff": 8, "experts": 4, "top_k": 2, "capacity_factor": None,
            "threads": 1, "steps": 2, "warmup": 1}
    r = bench.measure(2, conf)
    assert r["a2a_calls_per_step"] == 4
    assert r["a2a_MB_per_rank"] > 0
    assert r["a2a_MB_per_rank"] == pytest.approx(r["exact_MB_per_rank"], rel=1e-12)
    # Uniform routing predicts 4 * T * k * d * 4 bytes * (ep - 1) / ep; 24 tokens stray from it.
    assert r["model_MB_per_rank"] == pytest.approx(4 * 24 * 2 * 8 * 4 / 2 / 1e6)


def test_extrapolation_arithmetic():
    bench = _bench()
    model = {"d": 1024, "f": 4096, "e": 64, "k": 4, "t": 1000, "b": 2}
    hw = dict(bench.HW)
    one_node = bench.layer_times(model, 8, hw)
    assert one_node["ep"] == 8 and one_node["bytes_off_node_MB"] == 0
    volume = 4 * 1000 * 4 * 1024 * 2
    assert one_node["bytes_off_gpu_MB"] == pytest.approx(volume * 7 / 8 / 1e6)
    flops = 18 * 1000 * 4 * 1024 * 4096
    assert one_node["compute_ms"] == pytest.approx(1e3 * flops / (hw["peak_flops"] * hw["mfu"]))
    many = bench.layer_times(model, 64, hw)
    assert many["bytes_off_node_MB"] == pytest.approx(volume * 56 / 64 / 1e6)
    # comm / compute = 2 b f_off P / (9 F BW), independent of t, k and d.
    ratio = 2 * 2 * (56 / 64) * hw["peak_flops"] * hw["mfu"] / (9 * 4096 * hw["ib_Bps"] * hw["ib_efficiency"])
    assert many["comm_over_compute"] == pytest.approx(ratio)
    limited = bench.layer_times(model, 64, hw, node_limit=2)
    assert limited["bytes_off_node_MB"] < many["bytes_off_node_MB"]
