"""Declarative key maps between Hugging Face checkpoint names and moekit state-dict names.

A `Rule` pairs an HF name pattern with one of our tensors and says which part of that tensor the
HF tensor is. Patterns use `{L}` for the layer and `{E}` for the expert index:

    Rule("model.layers.{L}.self_attn.q_proj.weight", "blocks.{L}.attn.q_proj.weight")
        the whole tensor
    Rule("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "blocks.{L}.ffn.experts.w_in", index="E", part=GATE)
        expert E's gate rows: ours[E] split in two along its first dim, first half. Our experts
        are stacked (E, 2F, D) with the gate rows first, then the up rows (transformers'
        fused `gate_up_proj` layout), so one rule per HF projection stacks or unstacks them.
    Rule(..., index=0, part=UP)
        a fixed index: the shared expert, stored by us as a stack of one
    Rule(..., read_only=True)
        another on-disk form accepted when loading (fused expert tensors) but never written

`Ignore` names HF tensors that are deliberately not loaded, with the reason.

The same rules drive both directions, and `check_coverage` proves that the HF tensors tile every
one of our tensors exactly once, so a missing or doubled piece is an error, never a silent gap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

GATE = (0, 2)  # first of two equal row blocks: the gate projection of a gated FFN
UP = (1, 2)  # second block: the up projection


def _compile(pattern: str) -> re.Pattern:
    """{L} and {E} match an index (captured); {*} matches any rest of a name (Ignore only)."""
    out = []
    for p in re.split(r"(\{[LE*]\})", pattern):
        if p in ("{L}", "{E}"):
            out.append(f"(?P<{p[1]}>\\d+)")
        elif p == "{*}":
            out.append(".+")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Slot:
    """Which part of one of our tensors an HF tensor is: t[index] (if index is not None), then
    block part[0] of part[1] equal blocks along the first remaining dim (if part is not None)."""

    index: int | None = None
    part: tuple[int, int] | None = None

    def view(self, t: Tensor) -> Tensor:
        if self.index is not None:
            t = t[self.index]
        if self.part is not None:
            k, n = self.part
            size = t.shape[0] // n
            t = t.narrow(0, k * size, size)
        return t

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...] | None:
        """The slot's shape within a tensor of shape `full`; None if it does not fit."""
        shape = list(full)
        if self.index is not None:
            if not shape or not 0 <= self.index < shape[0]:
                return None
            shape = shape[1:]
        if self.part is not None:
            k, n = self.part
            if not shape or shape[0] % n:
                return None
            shape[0] //= n
        return tuple(shape)

    def box(self, full: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The region of our tensor it covers, as ranges over the first two dims."""
        d0 = full[0] if full else 1
        d1 = full[1] if len(full) > 1 else 1
        if self.index is None:
            r0, r1 = (0, d0), (0, d1)
            if self.part is not None:
                k, n = self.part
                r0 = (k * d0 // n, (k + 1) * d0 // n)
            return r0, r1
        r0 = (self.index, self.index + 1)
        if self.part is None:
            return r0, (0, d1)
        k, n = self.part
        return r0, (k * d1 // n, (k + 1) * d1 // n)

    def describe(self) -> str:
        s = "" if self.index is None else f"[{self.index}]"
        if self.part is not None:
            s += f" block {self.part[0] + 1} of {self.part[1]}"
        return s


@dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    index: str | int | None = None  # "E": the {E} placeholder indexes our first dim; an int: fixed
    part: tuple[int, int] | None = None
    read_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "_hf_rx", _compile(self.hf))
        object.__setattr__(self, "_ours_rx", _compile(self.ours))
        if (self.index == "E") != ("{E}" in self.hf):
            raise ValueError(f"Rule {self.hf!r}: index='E' and an {{E}} placeholder go together")

    def match_hf(self, key: str) -> tuple[str, Slot] | None:
        m = self._hf_rx.match(key)
        if m is None:
            return None
        groups = m.groupdict()
        ours = self.ours.replace("{L}", groups.get("L", ""))
        index = int(groups["E"]) if self.index == "E" else self.index
        return ours, Slot(index, self.part)

    def whole_hf_name(self, key: str) -> str | None:
        """The HF name of our whole tensor `key` under this rule (read-only forms included, for
        tools that address transformers' in-memory names, as PEFT adapters do); None when the
        rule does not apply to `key` or maps only a part of it."""
        m = self._ours_rx.match(key)
        if m is None or self.index is not None or self.part is not None:
            return None
        return self.hf.replace("{L}", m.groupdict().get("L", ""))

    def expand_ours(self, key: str, shape: tuple[int, ...]) -> list[tuple[str, Slot]]:
        """The HF names (and slots) this rule writes for our tensor `key`; [] if it does not apply."""
        if self.read_only:
            return []
        m = self._ours_rx.match(key)
        if m is None:
            return []
        name = self.hf.replace("{L}", m.groupdict().get("L", ""))
        if self.index == "E":
            return [(name.replace("{E}", str(e)), Slot(e, self.part)) for e in range(shape[0])]
        return [(name, Slot(self.index, self.part))]


@dataclass(frozen=True)
class Ignore:
    """HF tensors deliberately left out; `when(layer, hf_config)` narrows it (None = always)."""

    hf: str
    why: str
    when: Callable[[dict[str, str], dict[str, Any]], bool] | None = None

    def __post_init__(self):
        object.__setattr__(self, "_rx", _compile(self.hf))

    def matches(self, key: str, hf_config: dict[str, Any]) -> bool:
        m = self._rx.match(key)
        return m is not None and (self.when is None or self.when(m.groupdict(), hf_config))


class KeyMap:
    def __init__(self, rules: list[Rule], ignore: list[Ignore] = ()):
        self.rules = list(rules)
        self.ignore = list(ignore)

    def to_ours(self, key: str) -> tuple[str, Slot] | None:
        hits = [hit for rule in self.rules if (hit := rule.match_hf(key)) is not None]
        if len(hits) > 1:  # pragma: no cover - a bug in a family's map
            raise AssertionError(f"HF key {key!r} matches several rules: {hits}")
        return hits[0] if hits else None

    def ignored(self, key: str, hf_config: dict[str, Any]) -> Ignore | None:
        for ig in self.ignore:
            if ig.matches(key, hf_config):
                return ig
        return None

    def to_hf(self, ours: dict[str, tuple[int, ...]]) -> list[tuple[str, str, Slot]]:
        """(hf name, our key, slot) for every HF tensor our tensors of these shapes produce,
        in our order; raises if some tensor is not fully covered by the map."""
        plan, unmapped = [], []
        for key, shape in ours.items():
            found = [(hf, key, slot) for rule in self.rules for hf, slot in rule.expand_ours(key, shape)]
            if not found:
                unmapped.append(key)
            plan.extend(found)
        if unmapped:
            more = "..." if len(unmapped) > 8 else ""
            raise ValueError(f"no Hugging Face name for tensor(s) {unmapped[:8]}{more}")
        pieces: dict[str, list[Slot]] = {}
        for _, key, slot in plan:
            pieces.setdefault(key, []).append(slot)
        problems = check_coverage(ours, pieces)
        if problems:  # pragma: no cover - a bug in a family's map
            raise AssertionError("key map does not tile our tensors: " + "; ".join(problems))
        return plan


def check_coverage(shapes: dict[str, tuple[int, ...]], pieces: dict[str, list[Slot]]) -> list[str]:
    """Problems with how `pieces` tile each tensor of `shapes`: parts missing or given twice.

    Counts coverage on the grid cut by every piece's boundaries, so the cost is the number of
    pieces (experts x projections), not the number of weights."""
    problems = []
    for key, shape in shapes.items():
        slots = pieces.get(key, [])
        if not slots:
            problems.append(f"{key}: missing")
            continue
        boxes = [s.box(shape) for s in slots]
        cuts0 = sorted({b for (r0, _) in boxes for b in r0})
        cuts1 = sorted({b for (_, r1) in boxes for b in r1})
        d0 = shape[0] if shape else 1
        d1 = shape[1] if len(shape) > 1 else 1
        cuts0 = sorted(set(cuts0) | {0, d0})
        cuts1 = sorted(set(cuts1) | {0, d1})
        pos0 = {c: i for i, c in enumerate(cuts0)}
        pos1 = {c: i for i, c in enumerate(cuts1)}
        grid = torch.zeros(len(cuts0) - 1, len(cuts1) - 1, dtype=torch.int32)
        for r0, r1 in boxes:
            grid[pos0[r0[0]]:pos0[r0[1]], pos1[r1[0]]:pos1[r1[1]]] += 1
        if bool((grid == 0).any()):
            missing = [s for s in _uncovered(grid, cuts0, cuts1)]
            problems.append(f"{key}: part(s) {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''} not provided")
        if bool((grid > 1).any()):
            problems.append(f"{key}: some part provided more than once")
    return problems


def _uncovered(grid: Tensor, cuts0: list[int], cuts1: list[int]) -> list[str]:
    out = []
    for i, j in (grid == 0).nonzero().tolist():
        out.append(f"[{cuts0[i]}:{cuts0[i + 1]}, {cuts1[j]}:{cuts1[j + 1]}]")
    return out
