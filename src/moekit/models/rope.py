"""Rotary position embedding frequencies, with the context-extension ("rope scaling") schemes that
Hugging Face checkpoints of the decoder families use.

Shape legend: B batch, L positions, d rotary dim (the rotated part of a head), h = d / 2.

RoPE (Su et al. 2021, RoFormer, eq. 34) rotates pair i of a head by position * inv_freq_i with
inv_freq_i = theta^(-2i/d). The schemes below only change inv_freq (and, for YaRN, scale cos/sin):

- "linear" (position interpolation, Chen et al. 2023, arXiv 2306.15595): every frequency / factor.
- "yarn" (Peng et al. 2023, arXiv 2309.00071, section 3.2-3.4): "NTK-by-parts" interpolation.
  Dimensions that rotate many times within the original context (wavelength short against it)
  keep their frequency, those that rotate less than once are divided by `factor`, and a linear
  ramp blends the two in between; the ramp's ends are the dims completing beta_fast and beta_slow
  rotations over `original_max_position_embeddings`. The attention temperature of section 3.4,
  sqrt(1/t) = 0.1 ln(s) + 1, multiplies cos and sin (so q.k scales by its square). DeepSeek-V2/V3
  (MLA) instead state it through `mscale` / `mscale_all_dim`; their attention additionally
  multiplies the softmax scale by mscale(factor, mscale_all_dim)^2 (see `mla_softmax_multiplier`).
- "llama3" (Meta, Llama 3.1 release code): frequencies whose wavelength exceeds
  original_context / low_freq_factor are divided by factor, those shorter than
  original_context / high_freq_factor are kept, a smooth blend in between.

Types that depend on the current sequence length ("dynamic" NTK, "longrope") are refused with an
error naming the type: their frequencies change during generation, which a cache built with the
old frequencies does not survive without the bookkeeping `transformers` does for them.

The arithmetic follows `transformers`' order of float32 operations so that logits match it to
the last bit where possible (greedy generation must agree token for token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ROPE_SCALING_TYPES = ("linear", "yarn", "llama3")
# Types we know of but do not implement; named in the error so users know it is deliberate.
_REFUSED = ("dynamic", "longrope", "su", "proportional", "mrope", "ntk")

# Allowed keys per type: name -> default (None = required).
_KEYS: dict[str, dict[str, Any]] = {
    "linear": {"factor": None},
    "yarn": {
        "factor": None,
        "original_max_position_embeddings": None,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": None,  # DeepSeek's numerator mscale; None = not given
        "mscale_all_dim": None,  # DeepSeek's denominator mscale and softmax correction; None = not given
        "attention_factor": None,  # explicit cos/sin multiplier; None = derived from factor (and mscale)
        "truncate": True,  # round the ramp ends to whole dims (transformers' default)
    },
    "llama3": {
        "factor": None,
        "low_freq_factor": None,
        "high_freq_factor": None,
        "original_max_position_embeddings": None,
    },
}
_OPTIONAL_NONE = {"mscale", "mscale_all_dim", "attention_factor"}


def _number(owner: str, key: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{owner}.rope_scaling[{key!r}] must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{owner}.rope_scaling[{key!r}] must be > 0, got {value}")
    return float(value)


def check_rope_scaling(owner: str, scaling: dict | None) -> dict | None:
    """Validate a rope-scaling dict and return a normalised copy: key "type" (the alias
    "rope_type" is accepted), every allowed key present with its default filled in. None and
    type "default" mean plain RoPE and return None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"{owner}.rope_scaling must be None or a dict, got {type(scaling).__name__}")
    given = dict(scaling)
    kind = given.pop("type", None)
    alias = given.pop("rope_type", None)
    if kind is not None and alias is not None and kind != alias:
        raise ValueError(f"{owner}.rope_scaling has type={kind!r} and rope_type={alias!r}; give one")
    kind = kind if kind is not None else alias
    if kind is None:
        raise ValueError(f"{owner}.rope_scaling needs a 'type', one of {list(ROPE_SCALING_TYPES)}")
    if kind == "default":
        if given:
            raise ValueError(f"{owner}.rope_scaling of type 'default' takes no parameters, got {sorted(given)}")
        return None
    if kind not in _KEYS:
        why = " (sequence-length dependent, not implemented)" if kind in _REFUSED else ""
        raise ValueError(
            f"{owner}.rope_scaling type {kind!r} is not supported{why}; supported: {list(ROPE_SCALING_TYPES)}"
        )
    allowed = _KEYS[kind]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"{owner}.rope_scaling: unknown key(s) {unknown} for type {kind!r}; allowed: {sorted(allowed)}"
        )
    out: dict[str, Any] = {"type": kind}
    for key, default in allowed.items():
        value = given.get(key, default)
        if value is None and key not in _OPTIONAL_NONE:
            raise ValueError(f"{owner}.rope_scaling[{key!r}] is required for type {kind!r}")
        if key == "truncate":
            if not isinstance(value, bool):
                raise TypeError(f"{owner}.rope_scaling['truncate'] must be True or False, got {value!r}")
        elif key == "original_max_position_embeddings":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.rope_scaling[{key!r}] must be an integer >= 1, got {value!r}")
        elif key in ("mscale", "mscale_all_dim") and value is not None:
            value = _number(owner, key, value, positive=False)
            if value < 0:
                raise ValueError(f"{owner}.rope_scaling[{key!r}] must be >= 0, got {value}")
        elif value is not None:
            value = _number(owner, key, value)
        out[key] = value
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(
            f"{owner}.rope_scaling: high_freq_factor ({out['high_freq_factor']}) must be > "
            f"low_freq_factor ({out['low_freq_factor']})"
        )
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN section 3.4: sqrt(1/t) = 0.1 ln(s) + 1; no correction when not extending (s <= 1).
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: dict | None) -> float:
    """The multiplier of cos and sin (1 except for YaRN)."""
    if scaling is None or scaling["type"] != "yarn":
        return 1.0
    if scaling["attention_factor"] is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling["mscale"], scaling["mscale_all_dim"]
    if m and m_all:
        return float(_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all))
    return _yarn_mscale(factor)


def mla_softmax_multiplier(scaling: dict | None) -> float:
    """DeepSeek-V2/V3 multi-head latent attention multiplies its softmax scale by
    mscale(factor, mscale_all_dim)^2 under YaRN (their released modelling code)."""
    if scaling is None or scaling["type"] != "yarn" or not scaling["mscale_all_dim"]:
        return 1.0
    m = _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
    return m * m


def inv_freq(dim: int, theta: float, scaling: dict | None = None, device=None) -> Tensor:
    """Inverse frequencies (d/2,) in float32."""
    exponents_h = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    if scaling is None:
        return 1.0 / (theta**exponents_h)
    kind = scaling["type"]
    if kind == "linear":
        return 1.0 / (theta**exponents_h) / scaling["factor"]
    if kind == "yarn":
        return _yarn_inv_freq(dim, theta, scaling, exponents_h)
    if kind == "llama3":
        return _llama3_inv_freq(theta, scaling, exponents_h)
    raise ValueError(f"unknown rope scaling type {kind!r}")  # pragma: no cover - validated earlier


def _yarn_inv_freq(dim: int, theta: float, s: dict, exponents_h: Tensor) -> Tensor:
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def dim_with_rotations(rotations: float) -> float:
        # The dim index whose wavelength fits `rotations` times into the original context
        # (YaRN eq. 17 solved for d).
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_with_rotations(s["beta_fast"]), dim_with_rotations(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp_h = ((torch.arange(dim // 2, dtype=torch.float32, device=exponents_h.device) - low) / (high - low)).clamp(0, 1)
    keep_h = 1 - ramp_h  # 1 = keep the original frequency (fast dims), 0 = fully interpolate
    pos_freqs_h = theta**exponents_h
    extrapolated_h = 1.0 / pos_freqs_h
    interpolated_h = 1.0 / (factor * pos_freqs_h)
    return interpolated_h * (1 - keep_h) + extrapolated_h * keep_h


def _llama3_inv_freq(theta: float, s: dict, exponents_h: Tensor) -> Tensor:
    base_h = 1.0 / (theta**exponents_h)
    factor, orig = s["factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / s["low_freq_factor"], orig / s["high_freq_factor"]
    wavelen_h = 2 * math.pi / base_h
    scaled_h = torch.where(wavelen_h > low_wavelen, base_h / factor, base_h)
    smooth_h = (orig / wavelen_h - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended_h = (1 - smooth_h) * scaled_h / factor + smooth_h * scaled_h
    medium_h = ~(wavelen_h < high_wavelen) * ~(wavelen_h > low_wavelen)
    return torch.where(medium_h, blended_h, scaled_h)


def rope_cos_sin(
    position_ids_BL: Tensor, dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin (B, L, d) for the rotate-half layout, computed in float32 every call (no buffer,
    so casting the model to bf16 cannot round the frequencies), then cast to `dtype`."""
    freq_h = inv_freq(dim, theta, scaling, device=position_ids_BL.device)
    angles_BLh = position_ids_BL.float()[..., None] * freq_h  # (B, L, d/2)
    emb_BLd = torch.cat((angles_BLh, angles_BLh), dim=-1)  # (B, L, d)
    mult = attention_factor(scaling)
    cos, sin = emb_BLd.cos(), emb_BLd.sin()
    if mult != 1.0:
        cos, sin = cos * mult, sin * mult
    return cos.to(dtype), sin.to(dtype)
