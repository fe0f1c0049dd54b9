"""What the experts learned: label every byte of Python source with a lexical class, run a model
over it, and count which classes each expert receives in each MoE layer.

Shape legend: B sequences, L tokens per sequence, T tokens (B*L flattened), E experts, K top-k,
C byte classes.

Classes come from Python's own `tokenize` module, so they are exact, not guessed by regex:
keyword (`keyword.iskeyword`), identifier (other NAME tokens), digits (NUMBER), string (STRING
and f-string parts), comment (COMMENT), operator (OP and anything else), whitespace (spaces,
tabs and newlines between or around tokens, including indentation).
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

CLASSES = ("keyword", "identifier", "whitespace", "digits", "string", "comment", "operator")
KEYWORD, IDENTIFIER, WHITESPACE, DIGITS, STRING, COMMENT, OPERATOR = range(len(CLASSES))
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                     if hasattr(tokenize, n)}
_SPACE = set(" \t\r\n\f\v")


def label_python(source: bytes) -> np.ndarray | None:
    """One class id per byte of `source` (uint8), or None when it does not tokenize as Python."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Split exactly as StringIO.readline does (on "\n" only) so tokenize's (row, col) map back.
    lines = text.split("\n")
    lines = [s + "\n" for s in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    line_start = np.zeros(len(lines) + 2, dtype=np.int64)
    if lines:
        line_start[1 : len(lines) + 1] = np.cumsum([len(s) for s in lines])
    line_start[len(lines) + 1] = len(text)
    chars = np.array([WHITESPACE if ch in _SPACE else OPERATOR for ch in text], dtype=np.uint8)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER, tokenize.ENCODING):
                continue
            if tok.type == tokenize.NAME:
                cls = KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
            elif tok.type == tokenize.NUMBER:
                cls = DIGITS
            elif tok.type in _STRING_TYPES:
                cls = STRING
            elif tok.type == tokenize.COMMENT:
                cls = COMMENT
            else:
                cls = OPERATOR
            (r0, c0), (r1, c1) = tok.start, tok.end
            start = line_start[r0 - 1] + c0
            end = line_start[r1 - 1] + c1
            chars[start:end] = cls  # whitespace inside a string or comment belongs to it
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    # Expand from characters to bytes: a character of n UTF-8 bytes labels all n.
    if len(text) == len(source):
        return chars
    widths = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    return np.repeat(chars, widths)


def label_text(source: bytes) -> np.ndarray:
    """Python labels when the text parses; otherwise a coarse split (digits, whitespace, words)."""
    labels = label_python(source)
    if labels is not None:
        return labels
    out = np.full(len(source), OPERATOR, dtype=np.uint8)
    for m in re.finditer(rb"[A-Za-z_]\w*", source):
        out[m.start() : m.end()] = IDENTIFIER
    for m in re.finditer(rb"\d", source):
        out[m.start()] = DIGITS
    for m in re.finditer(rb"\s", source):
        out[m.start()] = WHITESPACE
    return out


def labelled_tokens(tokenizer, files: list[tuple[str, bytes]], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the class of each token (its first byte's class) from whole files."""
    ids, classes, total = [], [], 0
    for _, content in files:
        if total >= max_tokens:
            break
        labels = label_text(content)
        tok, starts = tokenizer.encode_with_offsets(content)
        if len(tok) == 0:
            continue
        ids.append(tok)
        classes.append(labels[np.clip(starts, 0, len(labels) - 1)])
        total += len(tok)
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    return np.concatenate(ids)[:max_tokens], np.concatenate(classes)[:max_tokens]


# ----------------------------------------------------------------------------- routing capture


def _layer_index(name: str, fallback: int) -> int:
    digits = [p for p in name.split(".") if p.isdigit()]
    return int(digits[0]) if digits else fallback


def _assignments(routing, num_tokens: int) -> Tensor:
    """(T, K) expert ids each token was routed to, whatever the router family."""
    from moekit.layers.routers import ExpertChoice, SoftRouting, TokenChoice

    if isinstance(routing, TokenChoice):
        idx_TK = routing.expert_idx_TK
        if routing.active_TK is not None:  # declined assignments (GShard) are not assignments
            idx_TK = torch.where(routing.active_TK.bool(), idx_TK, torch.full_like(idx_TK, -1))
        return idx_TK
    if isinstance(routing, ExpertChoice):
        num_experts, cap = routing.token_idx_EC.shape
        taken_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=routing.token_idx_EC.device)
        taken_TE[routing.token_idx_EC.reshape(-1), torch.arange(num_experts).repeat_interleave(cap)] = True
        expert_TE = torch.arange(num_experts, device=taken_TE.device).expand(num_tokens, -1)
        return torch.where(taken_TE, expert_TE, torch.full_like(expert_TE, -1))
    if isinstance(routing, SoftRouting):  # every token reaches every slot; its largest expert weight
        return routing.probs_TE.argmax(dim=-1, keepdim=True)
    raise TypeError(f"unknown routing output {type(routing).__name__}")


@dataclass
class RoutingSummary:
    num_experts: int
    layers: list[int] = field(default_factory=list)
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (C, E) assignment counts
    tokens_per_expert: dict[int, np.ndarray] = field(default_factory=dict)  # after capacity drops
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)  # entropy, drop, imbalance
    class_tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES), dtype=np.int64))

    def share(self, layer: int) -> np.ndarray:
        """(C, E): for each class, the share of its assignments each expert received."""
        c = self.counts[layer].astype(np.float64)
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1)

    def lift(self, layer: int) -> np.ndarray:
        """(C, E): share / the expert's overall share; 1 = the expert sees this class at its base rate."""
        c = self.counts[layer].astype(np.float64)
        overall = c.sum(axis=0) / max(c.sum(), 1)
        return self.share(layer) / np.maximum(overall, 1e-12)


@torch.no_grad()
def collect_routing(model: nn.Module, ids: np.ndarray, classes: np.ndarray, seq_len: int, batch_size: int = 8,
                    device: torch.device | str = "cpu") -> RoutingSummary:
    """Run `model` (eval mode) over `ids` in windows of `seq_len`; count classes per expert."""
    from moekit.layers.moe import MoE

    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("the model has no MoE layers to inspect")
    num_experts = moes[0][1].cfg.num_experts
    summary = RoutingSummary(num_experts)
    captured: dict[int, list] = {}
    hooks = []
    for i, (name, m) in enumerate(moes):
        layer = _layer_index(name, i)
        summary.layers.append(layer)
        summary.counts[layer] = np.zeros((len(CLASSES), m.cfg.num_experts), dtype=np.int64)
        summary.tokens_per_expert[layer] = np.zeros(m.cfg.num_experts)
        summary.scalars[layer] = {"router_entropy": 0.0, "drop_fraction": 0.0, "batches": 0}

        def hook(_mod, inputs, output, layer=layer):
            captured[layer] = [output, inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]]

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    n_windows = len(ids) // seq_len
    try:
        for start in range(0, n_windows, batch_size):
            stop = min(start + batch_size, n_windows)
            x_BL = torch.from_numpy(ids[start * seq_len : stop * seq_len].reshape(-1, seq_len)).long().to(device)
            cls_T = torch.from_numpy(classes[start * seq_len : stop * seq_len].astype(np.int64))
            captured.clear()
            model(x_BL)
            summary.class_tokens += np.bincount(cls_T.numpy(), minlength=len(CLASSES))
            for layer, (out, num_tokens) in captured.items():
                idx_TK = _assignments(out.routing, num_tokens).cpu()
                k = idx_TK.shape[1]
                valid = idx_TK.reshape(-1) >= 0
                flat_cls = cls_T.repeat_interleave(k)[valid]
                flat_exp = idx_TK.reshape(-1)[valid]
                np.add.at(summary.counts[layer], (flat_cls.numpy(), flat_exp.numpy()), 1)
                m = out.metrics
                summary.tokens_per_expert[layer] += m["tokens_per_expert"].float().cpu().numpy()
                s = summary.scalars[layer]
                s["router_entropy"] += float(m["router_entropy"])
                s["drop_fraction"] += float(m["drop_fraction"])
                s["batches"] += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for layer, s in summary.scalars.items():
        n = max(s.pop("batches"), 1)
        s["router_entropy"] /= n
        s["drop_fraction"] /= n
        tpe = summary.tokens_per_expert[layer]
        s["load_imbalance"] = float(tpe.max() / tpe.mean()) if tpe.mean() > 0 else 0.0
        s["experts_without_tokens"] = int((tpe == 0).sum())
    return summary
