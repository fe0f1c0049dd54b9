"""The map from moekit's LoRA adapters to PEFT's tensor names, shapes and config fields: the plan
`finetune/peft.py` (save_adapter, load_adapter) writes and reads adapter files by, and the PEFT
facts it rests on.

How PEFT addresses LoRA (read off the installed peft 0.21.2 and transformers 5.24; paths below
are under site-packages/)
------------------------------------------------------------------------------------------------
Files. `adapter_config.json` and `adapter_model.safetensors` (peft/utils/constants.py:400-401),
safetensors metadata {"format": "pt"}. Tensor keys are the PEFT model's state-dict names with the
adapter name removed (peft/utils/save_and_load.py:161-164): `base_model.model.` + the module's
name in the transformers model + `.lora_A.weight` / `.lora_B.weight`.

Linear modules (`target_modules`, peft/tuners/lora/layer.py, class Linear :910): lora_A is an
nn.Linear(in, r) and lora_B an nn.Linear(r, out) (:263-264), so the stored tensors are A (r, in)
and B (out, r); y = base(x) + scaling * lora_B(lora_A(dropout(x))) (:1102); scaling = alpha / r,
or alpha / sqrt(r) with `use_rslora` (:279-281). This is moekit's `LoraLinear` exactly, same
names and shapes. A `target_modules` entry matches a module whose name equals it or ends with
"." + it (peft/tuners/tuners_utils.py:2372-2376). With `target_modules` null PEFT falls back to
its default modules for the model_type (tuners/lora/model.py:695-704: q_proj/v_proj for
Mixtral), so an adapter without Linear targets must say `[]`.

Fused expert parameters (`target_parameters`, ParamWrapper, layer.py:2335-2700). transformers 5
holds each MoE layer's routed experts as two nn.Parameters of one module: `gate_up_proj`
(E, 2I, D), gate rows first (chunk(2) in the forward, models/mixtral/modeling_mixtral.py:65-66,
87-89), and `down_proj` (E, D, I); Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 the same
(modeling_qwen2_moe.py:280-281, modeling_qwen3_moe.py:219-220, modeling_olmoe.py:287-288,
modeling_deepseek_v3.py:170-171), none with `is_transposed` (integrations/moe.py:587, default
False). That is moekit's `Experts.w_in` (E, H, D) / `w_out` (E, D, F) layout. For a 3-D
parameter (E, d1, d2) PEFT first reads in=d1, out=d2 (layer.py:2397-2398), then swaps them when
the module is not `is_transposed` (:2435-2440): in = d2 (D for gate_up_proj, I for down_proj),
out = d1 (2I, D). Then
  - lora_A = nn.Linear(in, r * E), stored (r*E, in); lora_B = nn.Linear(r * E, out), stored
    (out, r*E) (:2455-2456). `r` in adapter_config.json is the rank of ONE expert.
  - The delta is per expert, with independent factors (get_delta_factors :2525-2542 and
    get_delta_weight :2544-2560 agree): A.reshape(E, r, in)[e] is expert e's A, i.e. rows
    e*r .. e*r+r-1 (expert-major), but B.reshape(out, r, E)[:, :, e] is expert e's B, i.e.
    columns k*E + e (rank-major, experts interleaved). delta[e] = scaling * B_e @ A_e, shape
    (out, in) = the parameter's (d1, d2); W[e] + delta[e] is applied by a parametrization of the
    parameter during the forward (:2305-2323 baddbmm, :2571-2600).
  - scaling = alpha / r (alpha / sqrt(r) with rsLoRA) with the per-expert r (:2459-2462).
  - lora_dropout must be 0, and DoRA, lora_bias, fan_in_fan_out are refused (:2363-2372, :2444).
So moekit's per-expert factors map exactly: A_in (E, r, D) -> A.reshape(E*r, D), B_in (E, H, r)
-> B_in.permute(1, 2, 0).reshape(H, r*E), and the same for w_out / down_proj. Experts that
moekit leaves without an adapter (`LoraSpec.experts`) are written with zero factors (delta 0,
exact); loading refuses an adapter that changes an expert the model has no adapter for.
The gate and up projections share one A per expert in both (the fused parameter is one LoRA).

Key names of several parameters of one module: each ParamWrapper adapts one parameter and wraps
the module (or the previous wrapper); PEFT walks `named_parameters(recurse=False)` in
registration order (tuners_utils.py:1242-1256), so gate_up_proj is wrapped first and down_proj
around it. The outer wrapper's factors are `...mlp.experts.lora_A.weight`, the inner one's
`...mlp.experts.base_layer.lora_A.weight`: with both targeted, `base_layer` marks gate_up_proj;
with one targeted, neither has it. Matching of `target_parameters`: equal, or ends with "." +
the entry (tuners_utils.py:1250).

Routers: every family's router is a module with a `weight` (E, D) nn.Parameter (e.g.
MixtralTopKRouter, modeling_mixtral.py:96-102), adapted through `target_parameters`
("mlp.gate.weight"): a 2-D parameter has E=1, in = D, out = E (layer.py:2399-2400, no swap),
A (r, D), B (E, r), delta = scaling * B @ A: moekit's `LowRankDelta` on the router weight.

PEFT's transformers-4 compatibility rewrite. For a model_type in transformers' checkpoint
conversion table (conversion_mapping.py:48-80: deepseek_v3, qwen3_moe, olmoe, ..., not qwen2_moe; PEFT adds
mixtral, peft/utils/transformers_weight_conversion.py:44-45), PEFT takes `target_modules` entries
equal to or ending in gate_proj / up_proj / down_proj (w1 / w2 / w3 / gate for Mixtral) for
transformers-4 per-expert Linears and rewrites them into `target_parameters` gate_up_proj /
down_proj with rank_pattern 2r and alpha_pattern 2*alpha (:402-470, called at every
get_peft_model / from_pretrained, tuners/tuners_utils.py:833-848). A shared expert or a dense MLP
layer, still nn.Linear named gate_proj/up_proj/down_proj in transformers 5, would then lose its
LoRA (and the experts get the wrong rank). A 2-D parameter target is the same LoRA as a Linear
target (E=1, in = shape[1], out = shape[0], no swap: layer.py:2399-2400, :2544-2547, same
`<module>.lora_A.weight` / `lora_B.weight` keys), and `target_parameters` entries are not
rewritten, so moekit addresses such Linears as "<...>.gate_proj.weight" in `target_parameters`.
An adapter PEFT itself made with gate_proj/up_proj in `target_modules` on such a model carries
that rank_pattern and is refused by `load_adapter` (per-module ranks).

Whole modules (`modules_to_save`): their full tensors are stored under their plain names,
`base_model.model.model.layers.0.input_layernorm.weight` (observed with save_pretrained). moekit's
`train_router` / `train_norms` write the routers / norms this way (the whole HF module: the
DeepSeek router's e_score_correction_bias buffer too).

What moekit writes and reads
----------------------------
The names are those of transformers' in-memory model (the key maps' read-only rules for fused
experts and Mixtral's renamed `mlp` block, moekit/hf/*.py), not the per-expert on-disk names.
Shared experts are stored by moekit as a stack of one (w_in gate+up fused) and by transformers
as three nn.Linear (gate_proj, up_proj, down_proj): the fused LoRA becomes LoRA on gate_proj and
up_proj with the same A and B split by rows, exact; loading needs the two A's equal (an adapter
trained on separate gate/up projections is rank 2r on the fused one: refused). One rank, alpha
and rsLoRA setting for every adapter (moekit's LoraSpec has one); `lora_dropout` is written 0
when expert or router parameters are targeted (PEFT refuses anything else there; dropout only
acts in training), else the spec's. Not supported, refused with the reason: DoRA, LoRA biases,
`rank_pattern` / `alpha_pattern`, .bin adapters, models no `to_hf` family expresses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from moekit.checkfiles import CheckpointError
from moekit.hf.api import model_family, unwrap
from moekit.hf.common import Family, NotRepresentable
from moekit.layers.lora import LoraExperts, LoraLinear, LowRankDelta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The order transformers registers a fused experts module's parameters in (see the docstring),
# which decides PEFT's wrapper nesting and so the `base_layer` parts of the keys.
FUSED_ORDER = ("gate_up_proj", "down_proj")
# Linear names PEFT takes for transformers-4 expert projections and rewrites in `target_modules`
# (peft/utils/transformers_weight_conversion.py:332-351, 422-470): we address such Linears
# through `target_parameters` ("<module>.weight"), which PEFT leaves alone.
V4_EXPERT_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"})



@dataclass
class Pair:
    """One lora_A / lora_B pair of the adapter file and the moekit factors it is."""

    module: str  # PEFT's module key, without PREFIX (may end in .base_layer)
    ours: str  # our tensor it adapts, for messages
    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]
    get: Callable[[], tuple[Tensor, Tensor]]  # (A, B) in PEFT's layout
    put: Callable[[Tensor, Tensor], None]
    kind: str  # "module" (target_modules) or "parameter" (target_parameters)
    target: str  # the full module or parameter name PEFT matches
    check: Callable[[Tensor, Tensor], None] | None = None  # raises when (A, B) cannot be loaded exactly
    share: tuple | None = None  # pairs with the same key must have equal A (gate/up of one fused LoRA)


@dataclass
class Plan:
    fam: Family
    pairs: list[Pair]
    rank: int
    alpha: float
    rslora: bool
    dropout: float
    hf_names: dict[str, str]  # our base tensor -> transformers' in-memory name (whole tensors)
    tensors: dict[str, Tensor]  # our base tensor by name


# ---------------------------------------------------------------------------------------------
# Names: our tensors -> transformers' in-memory names


def _whole_name(fam: Family, ours: str) -> str | None:
    """transformers' in-memory name of our whole tensor `ours`: a read-only rule's name when
    there is one (fused experts, Mixtral's `mlp` block), else the name the checkpoint uses."""
    names = [(r.read_only, n) for r in fam.keymap.rules if (n := r.whole_hf_name(ours)) is not None]
    names.sort(key=lambda x: not x[0])
    return names[0][1] if names else None


def _base_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Our tensors under the names they have without adapters (what `to_hf` maps): a LoRA
    module's `base.` part removed, a parametrized router weight under `weight`, a quantized
    (QLoRA) weight's packed data under the weight's name and its scales left out, factors left out."""
    lora_paths = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))]
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if ".lora_" in f".{key}":
            continue
        for p in lora_paths:
            if key.startswith(f"{p}.base."):
                key = f"{p}.{key[len(p) + 6:]}"
                break
        key = key.replace(".parametrizations.weight.original", ".weight")
        if ".parametrizations." in key or key.endswith("_scale"):
            continue
        if key.endswith(("weight_q", "w_in_q", "w_out_q")):  # a QLoRA base: the packed weight stands for it
            key = key[:-2]
        out.setdefault(key, t)
    return out


def resolve_family(model: nn.Module, hf_family: str | None, who: str) -> Family:
    try:
        return model_family(model, hf_family)
    except NotRepresentable as err:
        raise NotRepresentable(f"{who}: this model has no transformers counterpart, so no PEFT adapter for it: "
                               f"{err}") from None
    except TypeError as err:
        raise TypeError(f"{who}: {err}") from None


def plan_adapters(model: nn.Module, fam: Family, who: str) -> Plan:
    model = unwrap(model)
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts, LowRankDelta))]
    if not mods:
        raise ValueError(f"{who}: the model has no LoRA adapters; apply_lora(model, LoraSpec(...)) first")
    settings = {(m.rank, float(m.alpha), bool(m.rslora)) for _, m in mods}
    if len(settings) > 1:
        raise ValueError(f"{who}: adapters with different rank/alpha/rslora {sorted(settings)}; a PEFT adapter "
                         f"file here has one setting (apply_lora with one LoraSpec)")
    rank, alpha, rslora = settings.pop()
    spec = getattr(model, "lora", None) or {}
    tensors = _base_tensors(model)
    hf_names = {k: n for k in tensors if (n := _whole_name(fam, k)) is not None}

    def hf_of(ours: str) -> str:
        name = hf_names.get(ours)
        if name is None:
            raise NotRepresentable(f"{who}: {ours} has no transformers {fam.model_type} tensor of its own "
                                   f"(not in the {fam.model_type} key map), so PEFT cannot address its adapter")
        return name

    pairs: list[Pair] = []
    fused: dict[str, list[str]] = {}  # HF experts module -> its targeted parameters
    for path, m in mods:
        if isinstance(m, LoraLinear):
            name = hf_of(f"{path}.weight")
            module = name.removesuffix(".weight")
            if module.rpartition(".")[2] in V4_EXPERT_NAMES:
                pairs.append(_linear_pair(m, module, f"{path}.weight", "parameter", name))
            else:
                pairs.append(_linear_pair(m, module, f"{path}.weight", "module"))
        elif isinstance(m, LowRankDelta):
            router = path.rpartition(".parametrizations.")[0]
            name = hf_of(f"{router}.weight")
            pairs.append(_linear_pair(m, name.removesuffix(".weight"), f"{router}.weight", "parameter", name))
        else:
            for side in ("in", "out"):
                ours = f"{path}.w_{side}"
                name = _whole_name(fam, ours)
                if name is not None:
                    module, _, param = name.rpartition(".")
                    if param not in FUSED_ORDER:  # pragma: no cover - a family whose fused names differ
                        raise NotRepresentable(f"{who}: {ours} maps to {name}, not a fused experts parameter "
                                               f"({', '.join(FUSED_ORDER)})")
                    fused.setdefault(module, []).append(param)
                    pairs.append(_fused_pair(m, side, module, param, ours))
                else:
                    pairs += _split_pairs(fam, m, side, ours, who)
    # PEFT nests one wrapper per targeted parameter, the first registered innermost.
    for p in pairs:
        if p.kind == "parameter" and p.module in fused:
            params = sorted(fused[p.module], key=FUSED_ORDER.index)
            depth = len(params) - 1 - params.index(p.target.rpartition(".")[2])
            p.module += ".base_layer" * depth
    dropout = float(spec.get("dropout", 0.0))
    if any(p.kind == "parameter" for p in pairs):
        dropout = 0.0  # PEFT refuses dropout on parameter targets (layer.py:2363); inference is the same
    return Plan(fam, pairs, rank, alpha, rslora, dropout, hf_names, tensors)


def _linear_pair(m: nn.Module, module: str, ours: str, kind: str, target: str | None = None) -> Pair:
    def put(a: Tensor, b: Tensor) -> None:
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)

    return Pair(module, ours, tuple(m.lora_A.shape), tuple(m.lora_B.shape),
                 lambda: (m.lora_A.detach(), m.lora_B.detach()), put, kind, target or module)


def _fused_pair(m: LoraExperts, side: str, module: str, param: str, ours: str) -> Pair:
    a_sel, b_sel = getattr(m, f"lora_{side}_A"), getattr(m, f"lora_{side}_B")  # (S, r, in), (S, out, r)
    E, r, d_in, d_out = m.base.num_experts, a_sel.shape[1], a_sel.shape[2], b_sel.shape[1]
    ids = list(m.expert_ids)

    def get() -> tuple[Tensor, Tensor]:
        a = a_sel.detach().new_zeros(E, r, d_in)
        b = b_sel.detach().new_zeros(E, d_out, r)
        a[ids], b[ids] = a_sel.detach(), b_sel.detach()
        # A: expert-major rows e*r + k; B: rank-major columns k*E + e (layer.py:2534-2535)
        return a.reshape(E * r, d_in), b.permute(1, 2, 0).reshape(d_out, r * E)

    def unpack(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return a.reshape(E, r, d_in), b.reshape(d_out, r, E).permute(2, 0, 1)  # (E, r, in), (E, out, r)

    def check(a: Tensor, b: Tensor) -> None:
        a_ERI, b_EOR = unpack(a, b)
        for e in sorted(set(range(E)) - set(ids)):
            if bool((b_EOR[e].double() @ a_ERI[e].double()).abs().max() > 0):
                raise CheckpointError(
                    f"the adapter changes expert {e} of {ours} ({PREFIX}{module}.{param}), but this model's LoRA "
                    f"covers experts {ids} only; apply_lora with experts=None (all) to load it")

    def put(a: Tensor, b: Tensor) -> None:
        a_ERI, b_EOR = unpack(a, b)
        a_sel.copy_(a_ERI[ids])
        b_sel.copy_(b_EOR[ids])

    return Pair(module, ours, (E * r, d_in), (d_out, r * E), get, put, "parameter", f"{module}.{param}", check)


def _split_pairs(fam: Family, m: LoraExperts, side: str, ours: str, who: str) -> list[Pair]:
    """Experts transformers holds as separate nn.Linear per expert and projection (the shared
    expert): one LoRA per Linear, gate and up sharing our A, B split by rows."""
    a_sel, b_sel = getattr(m, f"lora_{side}_A"), getattr(m, f"lora_{side}_B")
    shape = (m.base.num_experts, b_sel.shape[1], a_sel.shape[2])
    pieces = [(n, slot) for rule in fam.keymap.rules for n, slot in rule.expand_ours(ours, shape)]
    if not pieces or any(not n.endswith(".weight") or slot.index is None for n, slot in pieces):
        raise NotRepresentable(f"{who}: {ours} has no transformers {fam.model_type} counterpart PEFT can adapt "
                               f"(neither a fused experts parameter nor one nn.Linear per expert)")
    pos = {e: i for i, e in enumerate(m.expert_ids)}
    pairs = []
    for name, slot in pieces:
        if slot.index not in pos:
            continue  # an expert without adapter: no LoRA on its Linears
        i, module = pos[slot.index], name.removesuffix(".weight")
        rows = (0, b_sel.shape[1]) if slot.part is None else (
            slot.part[0] * b_sel.shape[1] // slot.part[1], (slot.part[0] + 1) * b_sel.shape[1] // slot.part[1])

        def get(i=i, rows=rows) -> tuple[Tensor, Tensor]:
            return a_sel[i].detach(), b_sel[i, rows[0]:rows[1]].detach()

        def put(a: Tensor, b: Tensor, i=i, rows=rows) -> None:
            a_sel[i].copy_(a)
            b_sel[i, rows[0]:rows[1]].copy_(b)

        pairs.append(Pair(module, ours, tuple(a_sel.shape[1:]), (rows[1] - rows[0], b_sel.shape[2]), get, put,
                           "parameter", name, share=(ours, i)))
    return pairs


def saved_modules(model: nn.Module, plan: Plan, who: str) -> dict[str, list[str]]:
    """transformers modules whose whole tensors go in the adapter (`modules_to_save`): those of
    our parameters that train besides the LoRA factors (train_router, train_norms), each module
    with every tensor it has. {module: [our tensor names]}."""
    model = unwrap(model)
    by_id = {id(t): k for k, t in plan.tensors.items()}
    trained = [by_id.get(id(p), name) for name, p in model.named_parameters()
               if p.requires_grad and ".lora_" not in f".{name}"]
    modules: dict[str, list[str]] = {}
    adapted = {p.module.split(".base_layer")[0] for p in plan.pairs}
    for key in trained:
        name = plan.hf_names.get(key)
        if name is None:
            raise NotRepresentable(f"{who}: {key} trains besides the LoRA factors but has no transformers "
                                   f"{plan.fam.model_type} tensor; freeze it (requires_grad_(False)) or export the "
                                   f"whole model with moekit.hf.to_hf")
        module = name.rpartition(".")[0]
        if module in adapted:
            raise NotRepresentable(f"{who}: {key} trains and also has a LoRA adapter ({module}); PEFT cannot "
                                   f"save a module whole and adapt it: use train_router or the router target")
        modules.setdefault(module, [])
    for key, name in plan.hf_names.items():
        if name.rpartition(".")[0] in modules:
            modules[name.rpartition(".")[0]].append(key)
    return modules


def compress_targets(targets: set[str], universe: set[str]) -> list[str]:
    """The shortest name suffixes that match exactly `targets` among `universe` the way PEFT
    matches entries (equal, or ending in "." + entry): "q_proj" rather than every layer's name."""
    chosen = set()
    for t in sorted(targets):
        parts = t.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = {u for u in universe if u == suffix or u.endswith("." + suffix)}
            if hits <= targets:
                chosen.add(suffix)
                break
    return sorted(chosen)
