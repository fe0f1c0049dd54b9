"""PEFT-format adapters (finetune/peft.py) against PEFT itself: a tiny moekit model with random
LoRA factors, `to_hf` of its base and `save_adapter`, then `PeftModel.from_pretrained` on the
transformers model gives moekit's logits; an adapter PEFT wrote (get_peft_model, random init,
save_pretrained) loads into moekit with PEFT's logits. Then the refusals."""

import json

import peft  # a dependency of the [hf] extra: CI fails, not skips, without it
import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit.checkfiles import CheckpointError
from moekit.finetune.lora import LoraSpec, apply_lora
from moekit.finetune.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from moekit.hf import to_hf
from moekit.models import DecoderConfig, MLAConfig, build_model

TOL = 1e-4  # float32 logits; observed differences are ~1e-6




def mixtral_cfg(num_experts=5, d_ff=24) -> DecoderConfig:
    return DecoderConfig(vocab_size=97, d_model=40, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=36, max_seq_len=32,
                         moe=dict(d_ff=d_ff, num_experts=num_experts, top_k=2, router="softmax_topk"))


def qwen2_moe_cfg() -> DecoderConfig:  # shared expert with its gate, a dense layer, attention biases
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=20, attention_bias=True,
                         max_seq_len=32, dense_layers=(1,),
                         moe=dict(d_ff=10, num_experts=4, top_k=2, num_shared_experts=1, shared_d_ff=12,
                                  shared_expert_gate=True, router_options={"norm_topk_prob": False}))


def deepseek_cfg() -> DecoderConfig:  # MLA, sigmoid router with its bias, a shared expert, a dense layer
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=2, d_ff=20, max_seq_len=32, first_k_dense=1,
                         attention="mla", mla=MLAConfig(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6,
                                                        qk_rope_head_dim=4, v_head_dim=6),
                         moe=dict(d_ff=10, num_experts=4, top_k=2, router="sigmoid_bias", num_shared_experts=1,
                                  router_options=dict(n_group=2, topk_group=1, routed_scaling_factor=2.5)))


def qwen3_moe_cfg() -> DecoderConfig:  # per-head QK-norm, a dense layer (PEFT rewrites gate_proj targets here)
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=20,
                         max_seq_len=32, qk_norm="head", dense_layers=(0,), moe=dict(d_ff=10, num_experts=4, top_k=2))


def olmoe_cfg() -> DecoderConfig:  # QK-norm over the full projections, no top-k renormalisation
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=4, d_ff=20, max_seq_len=32, qk_norm="full",
                         moe=dict(d_ff=10, num_experts=4, top_k=2, router_options={"norm_topk_prob": False}))


def base_model(cfg: DecoderConfig, seed: int = 0):
    """A random moekit model with norms and biases moved off their init (so every term counts)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def randomize(model, seed: int, std: float = 0.3) -> None:
    """Random non-zero factors (B starts at zero), and routers / norms moved when they train."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager",
                                                attn_implementation="eager").eval()


def ids(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits if not hasattr(model, "peft_config") else model(input_ids=x).logits


CASES = {
    "mixtral": (mixtral_cfg, LoraSpec(rank=3, alpha=6, targets=("experts", "attention"))),
    "mixtral_some_experts_rslora": (mixtral_cfg, LoraSpec(rank=2, alpha=5, targets=("experts", "attention"),
                                                          experts=(1, 3), rslora=True)),
    "mixtral_router_lora": (mixtral_cfg, LoraSpec(rank=3, alpha=6, targets=("experts", "router"))),
    "qwen2_moe_all": (qwen2_moe_cfg, LoraSpec(rank=2, alpha=4, train_norms=True, targets=(
        "experts", "shared_experts", "attention", "dense_ffn"))),
    "qwen3_moe_dense_ffn": (qwen3_moe_cfg, LoraSpec(rank=2, alpha=4, targets=("experts", "attention", "dense_ffn"))),
    "olmoe_router_lora": (olmoe_cfg, LoraSpec(rank=2, alpha=4, targets=("experts", "attention", "router"))),
    "deepseek_v3_mla_train_router": (deepseek_cfg, LoraSpec(rank=2, alpha=3, train_router=True, targets=(
        "experts", "shared_experts", "attention"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapter_gives_moekit_logits_in_peft(case, tmp_path):
    make_cfg, spec = CASES[case]
    cfg = make_cfg()
    model = base_model(cfg)
    x = ids(cfg)
    base_logits = logits(model, x)
    to_hf(model, tmp_path / "hf")
    apply_lora(model, spec)
    randomize(model, seed=1)
    ours = logits(model, x)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter matters, so a lost one would show

    save_adapter(model, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "adapter").eval()
    theirs = logits(peft_model, x)
    assert (theirs - ours).abs().max() <= TOL

    # ... and back: the adapter loads into a fresh model with the same spec, bit for bit
    again = apply_lora(base_model(cfg), spec)
    load_adapter(again, tmp_path / "adapter")
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b), n


def test_adapter_files_are_peft_format(tmp_path):
    cfg = mixtral_cfg()
    model = apply_lora(base_model(cfg), LoraSpec(rank=3, alpha=6, dropout=0.1, targets=("experts", "attention")))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 6
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on parameter targets
    from safetensors import safe_open

    with safe_open(tmp_path / ADAPTER_WEIGHTS, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    p = "base_model.model.model.layers.0."
    assert shapes[p + "mlp.experts.base_layer.lora_A.weight"] == [5 * 3, 40]  # gate_up_proj: (E*r, D)
    assert shapes[p + "mlp.experts.base_layer.lora_B.weight"] == [2 * 24, 5 * 3]  # (2F, E*r)
    assert shapes[p + "mlp.experts.lora_A.weight"] == [5 * 3, 24]  # down_proj: (E*r, F)
    assert shapes[p + "mlp.experts.lora_B.weight"] == [40, 5 * 3]
    assert shapes[p + "self_attn.k_proj.lora_B.weight"] == [20, 3]
    assert len(shapes) == 2 * 2 * 6


def peft_written(hf_folder, out, config, seed, same_gate_up_A=False):
    """An adapter as PEFT writes it: get_peft_model with random factors, save_pretrained."""
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(hf_model(hf_folder), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    if same_gate_up_A:  # one A for gate and up, as moekit's fused shared-expert LoRA has
        with torch.no_grad():
            for name, m in peft_model.named_modules():
                if name.endswith("shared_expert.up_proj"):
                    gate = peft_model.get_submodule(name.replace("up_proj", "gate_proj"))
                    m.lora_A["default"].weight.copy_(gate.lora_A["default"].weight)
    peft_model.save_pretrained(out)
    return peft_model


def test_peft_written_adapter_loads_with_peft_logits(tmp_path):
    cfg = mixtral_cfg()
    base = base_model(cfg)
    to_hf(base, tmp_path / "hf")
    x = ids(cfg)
    peft_model = peft_written(tmp_path / "hf", tmp_path / "adapter", dict(
        r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), seed=3)
    theirs = logits(peft_model, x)
    model = apply_lora(base, LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    before = logits(model, x)
    load_adapter(model, tmp_path / "adapter")
    ours = logits(model, x)
    assert (ours - before).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOL


def test_peft_written_shared_expert_adapter(tmp_path):
    """Qwen2-MoE's shared expert is three nn.Linear in transformers, one fused stack in moekit:
    PEFT's gate_proj / up_proj LoRA loads when their A's agree, and is refused when they do not."""
    cfg = qwen2_moe_cfg()
    base = base_model(cfg)
    to_hf(base, tmp_path / "hf")
    x = ids(cfg)
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    spec = LoraSpec(rank=2, alpha=4, targets=("experts", "shared_experts", "attention", "dense_ffn"))
    peft_written(tmp_path / "hf", tmp_path / "independent", config, seed=4)
    model = apply_lora(base, spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shared_expert\.up_proj\.lora_A\.weight differs from .*gate_proj.*"
                                              r"rank 4"):
        load_adapter(model, tmp_path / "independent")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded

    peft_model = peft_written(tmp_path / "hf", tmp_path / "shared", config, seed=5, same_gate_up_A=True)
    load_adapter(model, tmp_path / "shared")
    assert (logits(model, x) - logits(peft_model, x)).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.fixture
def saved(tmp_path):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    randomize(model, seed=2)
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_refuses_another_rank(saved):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=4, alpha=6, targets=("experts", "attention")))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: r=3 but this model's adapters have rank 4; "
                                              r"apply_lora with LoraSpec\(rank=3"):
        load_adapter(model, saved)


def test_refuses_another_alpha(saved):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=8, targets=("experts", "attention")))
    with pytest.raises(CheckpointError, match=r"lora_alpha=6.0 but this model's adapters have alpha 8"):
        load_adapter(model, saved)


@pytest.mark.parametrize("other", [dict(num_experts=6), dict(d_ff=20)])
def test_refuses_adapter_of_another_model(saved, other):
    model = apply_lora(base_model(mixtral_cfg(**other)), LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    with pytest.raises(CheckpointError) as err:
        load_adapter(model, saved)
    assert "does not fit this model" in _one_line(err) and "mlp.experts" in str(err.value)


def test_refuses_other_targets(saved):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts",)))
    with pytest.raises(CheckpointError) as err:
        load_adapter(model, saved)
    assert "holds tensors this model has no adapter or module for: " in _one_line(err)
    assert "self_attn.k_proj.lora_A.weight" in str(err.value)


def test_refuses_missing_tensors(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / ADAPTER_WEIGHTS)
    del tensors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    save_file(tensors, saved / ADAPTER_WEIGHTS)
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    with pytest.raises(CheckpointError, match=r"lacks tensors for this model's adapters: "
                                              r"base_model\.model\.model\.layers\.1\.mlp\.experts\.lora_B\.weight"):
        load_adapter(model, saved)


def test_refuses_expert_the_model_does_not_adapt(saved):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts", "attention"),
                                                           experts=(0, 2)))
    with pytest.raises(CheckpointError, match=r"changes expert 1 of blocks\.0\.ffn\.experts\.w_in .* covers experts "
                                              r"\[0, 2\] only"):
        load_adapter(model, saved)


def test_refuses_missing_file_and_bad_json(saved):
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    (saved / ADAPTER_WEIGHTS).rename(saved / "moved")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors is missing"):
        load_adapter(model, saved)
    (saved / "moved").rename(saved / ADAPTER_WEIGHTS)
    (saved / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 3,')
    with pytest.raises(CheckpointError, match=r"adapter_config.json is not valid JSON"):
        load_adapter(model, saved)
    (saved / ADAPTER_CONFIG).unlink()
    with pytest.raises(CheckpointError, match=r"adapter_config.json is missing"):
        load_adapter(model, saved)


def test_refuses_truncated_weights(saved):
    data = (saved / ADAPTER_WEIGHTS).read_bytes()
    (saved / ADAPTER_WEIGHTS).write_bytes(data[:-100])
    model = apply_lora(base_model(mixtral_cfg()), LoraSpec(rank=3, alpha=6, targets=("experts", "attention")))
    with pytest.raises(CheckpointError) as err:
        load_adapter(model, saved)
    assert "adapter_model.safetensors is not a readable safetensors file" in _one_line(err)


def test_save_refuses_model_without_adapters_or_family(tmp_path):
    with pytest.raises(ValueError, match=r"save_adapter: the model has no LoRA adapters; apply_lora"):
        save_adapter(base_model(mixtral_cfg()), tmp_path)
    cfg = DecoderConfig(vocab_size=61, d_model=24, n_layers=1, n_heads=4, d_ff=20, max_seq_len=32,
                        moe=dict(d_ff=10, num_experts=4, top_k=1, router="switch"))
    model = apply_lora(base_model(cfg), LoraSpec(rank=2, alpha=4, targets=("experts",)))
    with pytest.raises(ValueError, match=r"save_adapter: this model has no transformers counterpart"):
        save_adapter(model, tmp_path)
