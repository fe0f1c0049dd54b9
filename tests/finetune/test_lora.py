"""LoRA on stacked experts (layers/lora.py) against the slow reference: a per-expert loop with
the explicit weight W + s B A, forward and backward, fp32 and bf16, over degenerate shapes; the
whole-model apply / merge / freeze contract (finetune/lora.py)."""

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.finetune.lora import LoraSpec, apply_lora, lora_modules, merge_lora, quantize_base, trainable_summary
from moekit.layers.experts import Experts
from moekit.layers.lora import LoraExperts, LoraLinear
from moekit.layers.quantized import QuantizedExperts
from moekit.models import build_model, get_preset
from moekit.ops.activations import activate
from moekit.ops.quant import dequantize


def _lora(num_experts=4, d=16, f=24, rank=4, ids=None, bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = Experts(num_experts, d, f, "swiglu", bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            base.b_in.normal_()
            base.b_out.normal_()
    lora = LoraExperts(base, rank, alpha=8.0, expert_ids=ids)
    with torch.no_grad():  # B starts at zero; a random B makes the delta visible
        lora.lora_in_B.normal_(std=0.3)
        lora.lora_out_B.normal_(std=0.3)
    return lora


def _reference(lora, x_ND, expert_N):
    """Per-expert loop over rows, W + s * B @ A built explicitly for each expert, plain autograd."""
    base, s = lora.base, lora.scaling
    out = []
    for n in range(x_ND.shape[0]):
        e = int(expert_N[n])
        w_in, w_out = base.w_in[e].float(), base.w_out[e].float()
        if e in lora.expert_ids:
            i = lora.expert_ids.index(e)
            w_in = w_in + s * lora.lora_in_B[i].float() @ lora.lora_in_A[i].float()
            w_out = w_out + s * lora.lora_out_B[i].float() @ lora.lora_out_A[i].float()
        h = x_ND[n].float() @ w_in.t()
        if base.b_in is not None:
            h = h + base.b_in[e].float()
        y = activate(h.unsqueeze(0), base.activation)[0] @ w_out.t()
        if base.b_out is not None:
            y = y + base.b_out[e].float()
        out.append(y)
    return torch.stack(out) if out else x_ND.new_zeros(0, base.d_model).float()


def _rows(counts, d, dtype, seed=1):
    torch.manual_seed(seed)
    expert_N = torch.cat([torch.full((c,), e, dtype=torch.long) for e, c in enumerate(counts)])
    offs_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    return torch.randn(len(expert_N), d, dtype=dtype, requires_grad=True), offs_E, expert_N


CASES = [  # (rows per expert, adapter ids, bias)
    ([3, 0, 5, 2], None, False),  # an expert with no rows
    ([0, 0, 0, 0], None, False),  # empty input
    ([7], None, False),  # one expert
    ([2, 4, 1, 3], [1, 3], False),  # adapters on some experts only
    ([2, 4, 1, 3], None, True),  # biases (the PIECES path's bias rows)
]


@pytest.mark.parametrize("counts,ids,bias", CASES)
def test_grouped_forward_backward_matches_reference_fp32(counts, ids, bias):
    lora = _lora(num_experts=len(counts), ids=ids, bias=bias)
    x, offs, expert = _rows(counts, 16, torch.float32)
    y = lora.forward_grouped(x, offs, expert)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(lora, x_ref, expert)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if x.shape[0] == 0:  # empty input: an empty output whose backward runs and touches nothing
        y.sum().backward()
        assert lora.lora_in_A.grad is None or not lora.lora_in_A.grad.any()
        return
    g = torch.randn_like(y)
    params = [lora.lora_in_A, lora.lora_in_B, lora.lora_out_A, lora.lora_out_B]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g, allow_unused=True)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert lora.base.w_in.grad is None and not lora.base.w_in.requires_grad


def test_grouped_bf16_within_bf16_rounding():
    lora = _lora(num_experts=4, dtype=torch.bfloat16)
    x, offs, expert = _rows([5, 3, 0, 6], 16, torch.bfloat16)
    y = lora.forward_grouped(x, offs, expert).float()
    y_ref = _reference(lora, x.detach().float(), expert)
    # bf16 keeps 8 bits of mantissa: products of 16- and 24-wide sums land within a few 1e-2
    err = (y - y_ref).abs().max() / y_ref.abs().max()
    assert err < 2e-2, err
    y.sum().backward()
    assert lora.lora_in_A.grad is not None and lora.lora_in_A.grad.dtype == torch.float32


def test_padded_and_one_expert_forms_match_grouped():
    lora = _lora(num_experts=3, ids=[0, 2])
    torch.manual_seed(2)
    x_ECD = torch.randn(3, 4, 16)
    y_pad = lora.forward_padded(x_ECD)
    x_ND = x_ECD.reshape(12, 16)
    expert = torch.arange(3).repeat_interleave(4)
    y_ref = _reference(lora, x_ND, expert)
    torch.testing.assert_close(y_pad.reshape(12, -1), y_ref, rtol=1e-5, atol=1e-5)
    for e in range(3):
        torch.testing.assert_close(lora.forward_one(e, x_ECD[e]), y_ref[4 * e:4 * e + 4], rtol=1e-5, atol=1e-5)


def test_merged_experts_equal_adapted():
    lora = _lora(num_experts=4, ids=[1, 2], bias=True)
    x, offs, expert = _rows([3, 2, 4, 1], 16, torch.float32)
    merged = lora.merged()
    assert isinstance(merged, Experts)
    torch.testing.assert_close(merged.forward_grouped(x, offs, expert), lora.forward_grouped(x, offs, expert),
                               rtol=1e-5, atol=1e-5)


def test_fresh_adapter_changes_nothing():
    torch.manual_seed(0)
    base = Experts(4, 16, 24, "swiglu")
    x, offs, expert = _rows([3, 2, 4, 1], 16, torch.float32)
    want = base.forward_grouped(x, offs, expert)
    got = LoraExperts(base, 4, 8.0).forward_grouped(x, offs, expert)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_lora_experts_in_an_moe_layer_routes_like_the_merged_layer():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2)
    moe = MoE(cfg)
    moe.experts = LoraExperts(moe.experts, 4, 8.0)
    with torch.no_grad():
        moe.experts.lora_in_B.normal_(std=0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = moe(x).output
    out.sum().backward()
    assert moe.experts.lora_in_A.grad is not None and moe.experts.base.w_in.grad is None
    merged = MoE(cfg)
    merged.load_state_dict(moe.state_dict(), strict=False)
    merged.experts = moe.experts.merged()
    torch.testing.assert_close(merged(x).output, out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# whole models


def _model(preset="tiny", seed=0):
    torch.manual_seed(seed)
    return build_model(get_preset(preset))


def _randomize_b(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_in_B" in name or "lora_out_B" in name:
                p.normal_(std=0.05)


@pytest.mark.parametrize("preset,targets", [
    ("tiny", ("experts", "attention", "router")),
    ("tiny-qwen2-moe", ("experts", "shared_experts", "attention", "dense_ffn")),
])
def test_apply_freezes_base_and_merge_is_exact(preset, targets):
    model = _model(preset)
    apply_lora(model, LoraSpec(rank=4, alpha=8, targets=targets))
    _randomize_b(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    ids = torch.randint(0, 256, (2, 12))
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    model.train()
    model(ids).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    merge_lora(model)
    assert not lora_modules(model) and not hasattr(model, "lora")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_trainable_fraction_and_train_router_norms():
    model = _model("tiny")
    apply_lora(model, LoraSpec(rank=2, targets="experts", train_router=True, train_norms=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("router.weight") for n in names)
    assert any("norm" in n for n in names)
    summary = trainable_summary(model)
    assert 0 < summary["trainable"] < summary["total"]
    assert summary["fraction"] == summary["trainable"] / summary["total"]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_base_matches_its_dequantized_float_model(bits):
    model = _model("tiny")
    quantize_base(model, bits=bits)
    assert model.quantization.get("code", "int") == ("nf4" if bits == 4 else "int")
    apply_lora(model, LoraSpec(rank=4, targets=("experts", "attention")))
    _randomize_b(model)
    # the same adapters on a float model holding exactly the dequantized base
    ref = _model("tiny")
    state = ref.state_dict()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedExperts):
            key = name.rsplit(".base", 1)[0]
            state[f"{key}.w_in"], state[f"{key}.w_out"] = mod.weights(torch.float32)
        elif hasattr(mod, "qweight"):
            state[f"{name.rsplit('.base', 1)[0]}.weight"] = dequantize(mod.qweight())
    ref.load_state_dict(state)
    apply_lora(ref, LoraSpec(rank=4, targets=("experts", "attention")))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, 256, (2, 10))
    out, out_ref = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    out_ref.sum().backward()
    for (n, p), (_, q) in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                              ((n, p) for n, p in ref.named_parameters() if p.requires_grad)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_lora_linear_wraps_only_linears():
    with pytest.raises(TypeError, match="LoraLinear wraps"):
        LoraLinear(torch.nn.Conv1d(2, 2, 1), 2, 4.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "lora.rank"),
    (dict(alpha=-1), "lora.alpha"),
    (dict(dropout=1.0), "lora.dropout"),
    (dict(targets="experts,mlp"), "lora.targets: 'mlp'"),
    (dict(targets=()), "lora.targets"),
    (dict(experts="1,x"), "lora.experts"),
    (dict(experts=[-1]), "lora.experts"),
    (dict(rslora="yes"), "lora.rslora"),
])
def test_spec_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSpec(**kwargs)


def test_apply_errors():
    model = _model("tiny-dense")
    with pytest.raises(ValueError, match="has no experts; it has: attention"):
        apply_lora(model, LoraSpec(targets="experts"))
    model = _model("tiny")
    with pytest.raises(ValueError, match=r"lora.experts: expert ids must be in 0..7"):
        apply_lora(model, LoraSpec(targets=("attention", "experts"), experts=(1, 9)))
    assert not lora_modules(model) and not hasattr(model, "lora")  # nothing half-applied:
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either
    apply_lora(model, LoraSpec(targets="attention"))
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        apply_lora(model, LoraSpec(targets="attention"))


def test_merged_qlora_model_is_one_float_model_that_saves_and_loads(tmp_path):
    from moekit.layers.quantized import QuantizedLinear
    from moekit.models.io import load_checkpoint, save_model_checkpoint

    model = _model("tiny-qwen2-moe").eval()
    quantize_base(model, bits=4)  # experts, shared experts, dense FFN and attention
    apply_lora(model, LoraSpec(rank=4, targets=("experts", "attention")))  # adapters on two of them
    _randomize_b(model)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        adapted = model(ids).logits
    merge_lora(model)
    assert not any(isinstance(m, (QuantizedExperts, QuantizedLinear)) for m in model.modules())
    assert model.quantization is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    save_model_checkpoint(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged").eval()(ids).logits, adapted,
                                   rtol=1e-5, atol=1e-5)


def test_routing_settings_reach_every_router():
    from moekit.finetune.job import RoutingSettings, apply_routing
    from moekit.layers.moe import MoE
    from moekit.train.presets import compare_model

    model = build_model(compare_model())  # sigmoid_bias routers
    apply_routing(model, RoutingSettings(aux_loss_coef=0.0, bias_update_rate=0.0))
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and all(m.router.cfg.aux_loss_coef == 0.0 and m.router.opts.bias_update_rate == 0.0
                          for m in layers)
    ids = torch.randint(0, 256, (2, 16))
    assert float(model(ids).aux_loss) == 0.0
    apply_routing(model, RoutingSettings())  # None keeps what is there
    assert layers[0].router.cfg.aux_loss_coef == 0.0
    with pytest.raises(ValueError, match="routing.bias_update_rate: this model has no router with a bias update"):
        apply_routing(_model("tiny"), RoutingSettings(bias_update_rate=0.0))
    with pytest.raises(ValueError, match="routing.aux_loss_coef must be a number >= 0"):
        RoutingSettings(aux_loss_coef=-1)
