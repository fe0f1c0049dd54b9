"""What every Hugging Face family adapter shares: the `Family` record, the key-map rules common to
all Llama-style decoders, and the config translation helpers (reading config.json fields with
the defaults `transformers` uses, rope parameters, and the checks that say why a moekit config
cannot be written as a given family).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moekit.hf.keymap import GATE, UP, Ignore, KeyMap, Rule
from moekit.models.decoder import DecoderConfig
from moekit.models.rope import check_rope_scaling


class NotRepresentable(ValueError):
    """A moekit config that a given Hugging Face family cannot express; the message says why."""


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0], the transformers class
    description: str  # one line for the docs table
    keymap: KeyMap
    config_from_hf: Callable[[dict[str, Any]], DecoderConfig]
    config_to_hf: Callable[[DecoderConfig], dict[str, Any]]  # raises NotRepresentable
    # Our modules that transformers keeps in float32 whatever the model dtype (regexes on module names).
    float32_modules: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Key-map rules shared by the Llama-style decoders


DECODER_BASE = [
    Rule("model.embed_tokens.weight", "embed.weight"),
    Rule("model.norm.weight", "norm.weight"),
    Rule("lm_head.weight", "lm_head.weight"),
    Rule("model.layers.{L}.input_layernorm.weight", "blocks.{L}.attn_norm.weight"),
    Rule("model.layers.{L}.post_attention_layernorm.weight", "blocks.{L}.ffn_norm.weight"),
]

GQA_ATTENTION = [
    Rule(f"model.layers.{{L}}.self_attn.{p}_proj.{w}", f"blocks.{{L}}.attn.{p}_proj.{w}")
    for p in ("q", "k", "v", "o")
    for w in ("weight", "bias")
] + [
    Rule("model.layers.{L}.self_attn.q_norm.weight", "blocks.{L}.attn.q_norm.weight"),
    Rule("model.layers.{L}.self_attn.k_norm.weight", "blocks.{L}.attn.k_norm.weight"),
]

DENSE_MLP = [
    Rule("model.layers.{L}.mlp.gate_proj.weight", "blocks.{L}.ffn.gate_proj.weight"),
    Rule("model.layers.{L}.mlp.up_proj.weight", "blocks.{L}.ffn.up_proj.weight"),
    Rule("model.layers.{L}.mlp.down_proj.weight", "blocks.{L}.ffn.down_proj.weight"),
]


def routed_experts(block: str = "mlp") -> list[Rule]:
    """Router and per-expert gate/up/down projections of the Qwen-MoE / OLMoE / DeepSeek layout
    (what `save_pretrained` writes and the Hub holds), plus transformers' fused in-memory layout
    (gate_up_proj (E, 2F, D), down_proj (E, D, F)) accepted when reading."""
    p = f"model.layers.{{L}}.{block}"
    return [
        Rule(f"{p}.gate.weight", "blocks.{L}.ffn.router.weight"),
        Rule(f"{p}.experts.{{E}}.gate_proj.weight", "blocks.{L}.ffn.experts.w_in", index="E", part=GATE),
        Rule(f"{p}.experts.{{E}}.up_proj.weight", "blocks.{L}.ffn.experts.w_in", index="E", part=UP),
        Rule(f"{p}.experts.{{E}}.down_proj.weight", "blocks.{L}.ffn.experts.w_out", index="E"),
        Rule(f"{p}.experts.gate_up_proj", "blocks.{L}.ffn.experts.w_in", read_only=True),
        Rule(f"{p}.experts.down_proj", "blocks.{L}.ffn.experts.w_out", read_only=True),
    ]


def shared_expert(hf_module: str) -> list[Rule]:
    """One always-on expert stored as a plain MLP; ours is a stack of one."""
    p = f"model.layers.{{L}}.mlp.{hf_module}"
    return [
        Rule(f"{p}.gate_proj.weight", "blocks.{L}.ffn.shared_expert.ffn.w_in", index=0, part=GATE),
        Rule(f"{p}.up_proj.weight", "blocks.{L}.ffn.shared_expert.ffn.w_in", index=0, part=UP),
        Rule(f"{p}.down_proj.weight", "blocks.{L}.ffn.shared_expert.ffn.w_out", index=0),
    ]


COMMON_IGNORE = [
    Ignore("lm_head.weight", "tied to model.embed_tokens.weight (tie_word_embeddings is true)",
           when=lambda _, hf: bool(hf.get("tie_word_embeddings", False))),
    Ignore("model.layers.{L}.self_attn.rotary_emb.inv_freq", "rotary frequencies are recomputed from the config"),
]


# ---------------------------------------------------------------------------------------------
# config.json -> DecoderConfig


class Fields:
    """config.json values with the defaults of the transformers config class (5.24), so a
    config.json that leaves a field out means what it means to transformers."""

    def __init__(self, hf: dict[str, Any], defaults: dict[str, Any], model_type: str):
        self.hf, self.defaults, self.model_type = hf, defaults, model_type

    def __getitem__(self, key: str) -> Any:
        if key in self.hf:
            return self.hf[key]
        if key in self.defaults:
            return self.defaults[key]
        raise ValueError(f"config.json ({self.model_type}) lacks required field {key!r}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.hf.get(key, self.defaults.get(key, default))

    def refuse(self, key: str, allowed, why: str) -> None:
        value = self.get(key)
        if value not in allowed:
            raise ValueError(f"config.json ({self.model_type}): {key}={value!r} is not supported: {why}")


def check_common(f: Fields) -> None:
    f.refuse("hidden_act", ("silu",), "moekit's decoder uses SwiGLU (silu) feed-forwards")
    if f.hf.get("quantization_config"):
        q = f.hf["quantization_config"]
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise ValueError(
            f"config.json ({f.model_type}): quantized checkpoints (quant_method {method!r}) are not supported; "
            f"dequantize to bf16/fp32 safetensors first"
        )


def rope_from_hf(f: Fields) -> tuple[float, dict | None]:
    """rope_theta and our rope_scaling from either the transformers 5 form ("rope_parameters")
    or the older one (top-level "rope_theta" + "rope_scaling") that Hub configs use."""
    params = f.hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        params = dict(params)
        theta = params.pop("rope_theta", f.get("rope_theta", 10000.0))
    else:
        params = dict(f.hf.get("rope_scaling") or {})
        theta = f.get("rope_theta", 10000.0)
    kind = params.pop("rope_type", None)
    legacy = params.pop("type", None)
    kind = kind or legacy or "default"
    partial = params.pop("partial_rotary_factor", f.hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"config.json ({f.model_type}): partial_rotary_factor={partial} is not supported (full rotary only)"
        )
    if kind == "default":
        return float(theta), None
    if kind in ("yarn", "llama3"):
        # transformers defaults the pre-extension context to max_position_embeddings.
        params.setdefault("original_max_position_embeddings", f["max_position_embeddings"])
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = f["max_position_embeddings"] / params["original_max_position_embeddings"]
    optional = ("mscale", "mscale_all_dim", "attention_factor")
    params = {k: v for k, v in params.items() if not (k in optional and v is None)}
    return float(theta), check_rope_scaling(f"config.json ({f.model_type})", {"type": kind, **params})


def max_seq_len(f: Fields, window: int | None) -> int:
    """max_position_embeddings, capped at a sliding window: moekit attends to every earlier
    token, which equals sliding-window attention exactly while sequences fit in the window."""
    n = f["max_position_embeddings"]
    if window is not None and window < n:
        warnings.warn(
            f"{f.model_type}: sliding-window attention (window {window}) is not implemented; the model is "
            f"exact up to {window} tokens, so max_seq_len is capped at {window} (max_position_embeddings {n})",
            stacklevel=3,
        )
        return int(window)
    return int(n)


def decoder_fields(f: Fields, window: int | None = None) -> dict[str, Any]:
    """The DecoderConfig fields every Llama-style family reads the same way."""
    check_common(f)
    theta, scaling = rope_from_hf(f)
    heads = f["num_attention_heads"]
    kv = f.get("num_key_value_heads") or heads
    head_dim = f.hf.get("head_dim")
    if head_dim is not None and head_dim == f["hidden_size"] // heads and f["hidden_size"] % heads == 0:
        head_dim = None  # the derived value: keep the config minimal
    return dict(
        vocab_size=f["vocab_size"],
        d_model=f["hidden_size"],
        n_layers=f["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        head_dim=head_dim,
        d_ff=f["intermediate_size"],
        max_seq_len=max_seq_len(f, window),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(f["rms_norm_eps"]),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        init_std=float(f.get("initializer_range", 0.02)),
    )


def softmax_router(f: Fields, *, norm_topk_prob: bool, top_k_key: str = "num_experts_per_tok") -> dict[str, Any]:
    return dict(
        top_k=f[top_k_key],
        router="softmax_topk",
        router_options={"norm_topk_prob": bool(norm_topk_prob)},
        aux_loss_coef=float(f.get("router_aux_loss_coef", 0.01)),
    )


def sliding_window(f: Fields) -> int | None:
    """The Qwen convention: `sliding_window` only counts when `use_sliding_window` is true."""
    return f.get("sliding_window") if f.get("use_sliding_window", False) else None


# ---------------------------------------------------------------------------------------------
# DecoderConfig -> config.json


def require(model_type: str, ok: bool, why: str) -> None:
    if not ok:
        raise NotRepresentable(f"{model_type}: {why}")


def check_moe(model_type: str, cfg: DecoderConfig, routers: tuple[str, ...]) -> None:
    m = cfg.moe
    require(model_type, m is not None, "needs a MoE model (moe is None)")
    require(model_type, m.router in routers, f"router must be one of {list(routers)}, got {m.router!r}")
    require(model_type, m.capacity_factor is None, "transformers' MoE is dropless: capacity_factor must be None")
    require(model_type, m.activation == "swiglu", f"experts must use swiglu, got {m.activation!r}")
    require(model_type, not m.expert_bias, "experts have no biases in this family (expert_bias=True)")


def check_gqa(model_type: str, cfg: DecoderConfig, qk_norm: str, clip: bool = False) -> None:
    require(model_type, cfg.attention == "gqa", f"uses grouped-query attention, got attention={cfg.attention!r}")
    require(model_type, cfg.qk_norm == qk_norm, f"qk_norm must be {qk_norm!r}, got {cfg.qk_norm!r}")
    require(model_type, cfg.activation == "swiglu", f"dense FFNs must use swiglu, got {cfg.activation!r}")
    if not clip:
        require(model_type, cfg.clip_qkv is None, "has no clip_qkv")


def rope_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """Hub-style rope fields (top-level rope_theta and rope_scaling), which transformers 4.x and
    5.x both read."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    if s is None:
        out["rope_scaling"] = None
        return out
    hf = {"rope_type": s["type"]}
    for key, value in s.items():
        if key == "type" or value is None or (key == "truncate" and value is True):
            continue
        hf[key] = value
    out["rope_scaling"] = hf
    return out


def decoder_to_hf(model_type: str, architecture: str, cfg: DecoderConfig) -> dict[str, Any]:
    out = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
    }
    if cfg.attention == "gqa":
        out["head_dim"] = cfg.attn_head_dim
    out.update(rope_to_hf(cfg))
    return out


def router_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return {"num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_loss_coef,
            "output_router_logits": False}
