"""Modules holding weight-only quantized weights (format "moekit-q/1", ops/quant.py): a drop-in
`QuantizedLinear` and the expert kind `QuantizedExperts`. No parameters: the packed integers and
scales are buffers, so they travel with the state dict. Gradients flow to the input only (a frozen
base under LoRA, QLoRA), never to the weights.

Shape legend: E experts, D d_model, H first-projection width (2F for gated activations), F
down-projection width, N routed rows sorted by expert, C rows per expert of a padded buffer,
P an input width padded to whole blocks.

`QuantizedExperts` answers the expert-kind calls of layers/experts.py. It says `fused = False`,
so the dispatch plan (layers/plan.py) sends it down `Path.PIECES`: `forward_grouped` /
`forward_padded`, which dequantize one expert at a time and only the experts that got rows;
the native decode kernels, which read float weights directly, never see it. `weights(dtype)`
still answers (a full dequantized copy) for callers that want plain stacks.

Scales stay float32 whatever `model.to(dtype)` does to the float buffers; the dtype the
products run in (`compute_dtype`) follows such a cast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.layers.experts import Experts
from moekit.ops.activations import activate
from moekit.ops.quant import (
    SCALE_DTYPE,
    QTensor,
    check_bits,
    check_block,
    check_code,
    dequantize,
    packed_shape,
    qbmm,
    qgrouped_mm,
    qlinear,
    quantize,
)


class _Quantized(nn.Module):
    """Shared plumbing: buffers allocated from shapes alone (a checkpoint fills them), scales
    kept float32 across casts, the compute dtype following them."""

    _scale_names: tuple[str, ...] = ()

    def _init_format(self, bits: int, block: int, dtype: torch.dtype, code: str = "int") -> None:
        self.bits = check_bits(bits, type(self).__name__)
        self.block = check_block(block, type(self).__name__)
        self.code = check_code(code, self.bits, type(self).__name__)
        self.compute_dtype = dtype

    def _alloc(self, name: str, shape: tuple[int, ...], device) -> None:
        data_shape, scale_shape = packed_shape(shape, self.bits, self.block)
        int_dtype = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer(f"{name}_q", torch.zeros(data_shape, dtype=int_dtype, device=device))
        self.register_buffer(f"{name}_scale", torch.zeros(scale_shape, dtype=SCALE_DTYPE, device=device))
        self._scale_names = (*self._scale_names, f"{name}_scale")

    def _set(self, name: str, q: QTensor) -> None:
        getattr(self, f"{name}_q").copy_(q.data)
        getattr(self, f"{name}_scale").copy_(q.scales)

    def _q(self, name: str, width: int) -> QTensor:
        return QTensor(getattr(self, f"{name}_q"), getattr(self, f"{name}_scale"), self.bits, self.block, width,
                       self.code)

    def _apply(self, fn, recurse=True):
        # The scales go through `fn` for its device only: a cast to bf16 must not round them.
        scales = {name: self._buffers.pop(name) for name in self._scale_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in scales.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == SCALE_DTYPE else t.to(device=moved.device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def requires_grad(self) -> bool:
        return False


class QuantizedLinear(_Quantized):
    """`nn.Linear` with a quantized weight: y = x w'^T + b, no gradient to the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, bits: int = 8, block: int = 32,
                 dtype: torch.dtype = torch.float32, device=None, code: str = "int"):
        super().__init__()
        self._init_format(bits, block, dtype, code)
        self.in_features, self.out_features = in_features, out_features
        self._alloc("weight", (out_features, in_features), device)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, block: int = 32, code: str = "int") -> QuantizedLinear:
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits, block=block,
                  dtype=w.dtype, device=w.device, code=code)
        mod._set("weight", quantize(w, bits, block, code))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def qweight(self) -> QTensor:
        return self._q("weight", self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return qlinear(x, self.qweight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, block={self.block}, code={self.code}")


class QuantizedExperts(_Quantized):
    """E feed-forward experts with quantized stacks w_in (E, H, D) and w_out (E, D, F)."""

    fused = False  # Path.PIECES: the fused float ops and native decode kernels read float weights

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, hidden: int, bias: bool = False,
                 *, bits: int = 8, block: int = 32, dtype: torch.dtype = torch.float32, device=None,
                 code: str = "int"):
        super().__init__()
        self._init_format(bits, block, dtype, code)
        self.num_experts, self.d_model, self.d_ff, self.hidden = num_experts, d_model, d_ff, hidden
        self.activation = activation
        self._alloc("w_in", (num_experts, hidden, d_model), device)  # (E, H, D)
        self._alloc("w_out", (num_experts, d_model, d_ff), device)  # (E, D, F)
        self.register_buffer("b_in", torch.zeros(num_experts, hidden, dtype=dtype, device=device) if bias else None)
        self.register_buffer("b_out", torch.zeros(num_experts, d_model, dtype=dtype, device=device) if bias else None)

    @classmethod
    def like(cls, experts: Experts, bits: int, block: int = 32, device=None, code: str = "int") -> QuantizedExperts:
        """Empty quantized experts of `experts`' shapes (to be filled by `from_experts` or a checkpoint)."""
        w = experts.w_in
        return cls(experts.num_experts, experts.d_model, experts.d_ff, experts.activation, w.shape[1],
                   experts.b_in is not None, bits=bits, block=block, dtype=w.dtype,
                   device=w.device if device is None else device, code=code)

    @classmethod
    def from_experts(cls, experts: Experts, bits: int, block: int = 32, code: str = "int") -> QuantizedExperts:
        mod = cls.like(experts, bits, block, code=code)
        mod._set("w_in", quantize(experts.w_in, bits, block, code))
        mod._set("w_out", quantize(experts.w_out, bits, block, code))
        for name in ("b_in", "b_out"):
            b = getattr(experts, name)
            if b is not None:
                getattr(mod, name).copy_(b.detach())
        return mod

    def qweights(self) -> tuple[QTensor, QTensor]:
        """(w_in (E, H, D), w_out (E, D, F)) as packed weights."""
        return self._q("w_in", self.d_model), self._q("w_out", self.d_ff)

    @property
    def widths(self) -> tuple[int, int, int]:
        return self.d_model, self.hidden, self.d_ff

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Every expert dequantized, (E, H, D) and (E, D, F) in `dtype`: a full float copy, for
        callers that want plain stacks (the dispatch itself goes through the grouped calls)."""
        w_in, w_out = self.qweights()
        return dequantize(w_in, dtype), dequantize(w_out, dtype)

    def forward_grouped(self, x_ND: Tensor, offs_E: Tensor, expert_N: Tensor) -> Tensor:
        w_in, w_out = self.qweights()
        h_NH = qgrouped_mm(x_ND, w_in, offs_E)
        if self.b_in is not None:
            h_NH = h_NH + self.b_in.to(x_ND.dtype)[expert_N]
        y_ND = qgrouped_mm(activate(h_NH, self.activation), w_out, offs_E)
        if self.b_out is not None:
            y_ND = y_ND + self.b_out.to(x_ND.dtype)[expert_N]
        return y_ND

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        w_in, w_out = self.qweights()
        h_ECH = qbmm(x_ECD, w_in)
        if self.b_in is not None:
            h_ECH = h_ECH + self.b_in.to(x_ECD.dtype).unsqueeze(1)
        y_ECD = qbmm(activate(h_ECH, self.activation), w_out)
        if self.b_out is not None:
            y_ECD = y_ECD + self.b_out.to(x_ECD.dtype).unsqueeze(1)
        return y_ECD

    def forward_one(self, e: int, x_ND: Tensor) -> Tensor:
        w_in, w_out = self.qweights()
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        return qlinear(activate(qlinear(x_ND, w_in[e], b_in), self.activation), w_out[e], b_out)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"activation={self.activation}, bits={self.bits}, block={self.block}, code={self.code}")
