"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_test_module_basenames_are_unique():
    # pytest's default import mode puts each test directory on sys.path, so two test files with
    # the same basename in different folders break collection of the whole suite.
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in (Path(__file__).parent).rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def test_readme_headline_is_the_committed_result():
    """The compare table and gap in the README are the numbers of docs/results/compare_seeds/
    summary.json (written by `moekit compare --seeds ...`), so neither can change alone."""
    import json

    summary = json.loads((README.parent / "docs/results/compare_seeds/summary.json").read_text())
    text = README.read_text()
    assert summary["split"] == "test" and summary["seeds"] == [0, 1, 2]
    for variant, row in (("moe", "MoE, 8 experts top-2"), ("dense-active", "dense, same active params")):
        bpb = summary["variants"][variant]["test_bpb"]
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row} |"))
        assert f"{bpb['mean']:.4f}" in line and f"({bpb['min']:.4f}-{bpb['max']:.4f})" in line, line
    total = summary["variants"]["dense-total"]["test_bpb"]["mean"]
    assert f"| {total:.4f} (seed 0 only) |" in text
    assert f"**{summary['gap_pct_equal_tokens']:.2f}% lower**" in text
    per_seed = ", ".join(f"+{summary['gap_pct_equal_tokens_per_seed'][str(s)]:.2f}%" for s in summary["seeds"])
    assert f"(per seed {per_seed})" in text
    fast = summary["speedup_to_dense_active_quality"]
    st, tm = fast["steps_fraction"], fast["time_fraction"]
    assert (f"after\n{100 * st['mean']:.0f}% of its steps (min {100 * st['min']:.0f}%, max {100 * st['max']:.0f}%) "
            f"and {100 * tm['mean']:.0f}% of its training time (min {100 * tm['min']:.0f}%, max "
            f"{100 * tm['max']:.0f}%)") in text


def test_readme_quantization_table_is_the_committed_result():
    import json

    rows = json.loads((README.parent / "docs/results/quant_quality.json").read_text())["rows"]
    text = README.read_text()
    labels = {"moe": "| the headline's MoE (seed 0) |",
              "upcycled": "| upcycled decoder (`examples/upcycle_decoder.py`) |"}
    for model, label in labels.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(label))
        got = {r["format"]: r for r in rows if r["model"] == model}
        want = [f"{got['float32']['bits_per_byte']:.4f}"] + [
            f"{got[f]['bits_per_byte']:.4f} ({got[f]['increase_pct']:+.2f}%)" for f in ("int8", "4-bit")]
        assert [c.strip() for c in line.strip("|").split("|")[1:]] == want, line


FINETUNE_LABELS = {
    "full": "full", "lora": "LoRA r=2, experts + attention", "lora-attention": "LoRA r=2, attention only",
    "qlora": "QLoRA (NF4) r=2, experts + attention", "lora-r8": "LoRA r=8, experts + attention",
}


def finetune_rows(study: dict) -> list[str]:
    """The README's fine-tuning table rows, from docs/results/finetune_study.json."""
    out = []
    for name, r in study["rows"].items():
        a = r["test_bpb_after"]
        gain = "" if "recovered_of_full" not in r else f"{100 * r['recovered_of_full']:.0f}%"
        out.append(f"| {FINETUNE_LABELS[name]} | {100 * r['trainable_fraction']:.2f}% | {r['weight_mib']:.2f} | "
                   f"{a['mean']:.4f} [{a['min']:.4f}-{a['max']:.4f}] | {gain} |")
    return out


def test_readme_finetune_numbers_are_the_committed_results():
    import json

    results = README.parent / "docs/results"
    study = json.loads((results / "finetune_study.json").read_text())
    bench = json.loads((results / "bench_lora.json").read_text())["rows"]
    text = README.read_text()
    for row in finetune_rows(study):
        assert row in text, row
    rows = study["rows"]
    before = {f"{r['test_bpb_before']['mean']:.4f}" for r in rows.values()}
    assert len(before) == 1 and f"Test bits/byte before: {before.pop()}." in text
    flat = " ".join(text.split())
    assert (f"recovers {100 * rows['lora']['recovered_of_full']:.0f}% of full fine-tuning's gain" in flat)
    assert f"recovers {100 * rows['lora-r8']['recovered_of_full']:.0f}%." in flat
    assert (f"QLoRA ends within {100 * rows['qlora']['final_bpb_gap_to_lora']:.1f}% of LoRA with "
            f"{100 * rows['qlora']['weight_memory_vs_lora']:.0f}% of its weight memory") in flat
    coarse, fine = bench["coarse_train"]["ratio_to_frozen_base"], bench["fine_train"]["ratio_to_frozen_base"]
    assert (f"costs {coarse['moekit LoRA']:.2f}x (8 experts) and {fine['moekit LoRA']:.2f}x (64 experts) of the "
            f"frozen base; a per-expert Python loop costs {coarse['per-expert loop LoRA']:.2f}x and "
            f"{fine['per-expert loop LoRA']:.2f}x") in flat
