"""moekit.convert: dense models to MoE models.

    from moekit.convert import upcycle, moebert, distill, DistillConfig
    moe_lm = upcycle(dense_lm, num_experts=8, top_k=2)                       # Komatsuzaki et al. 2022
    moe_bert = moebert(bert, num_experts=4, shared_neurons=512, data=batches)  # Zuo et al. 2022
    distill(moe_bert, bert, batches, DistillConfig(steps=300))               # layer-wise + output losses

See docs/convert.md.
"""

from moekit.convert.common import (
    ConversionError,
    dense_ffn_layers,
    ffn_flops_per_token,
    moe_flops_per_token,
)
from moekit.convert.distill import DistillConfig, distill
from moekit.convert.moebert import mean_pool, moebert, neuron_importance, split_neurons
from moekit.convert.refit import refit_experts
from moekit.convert.upcycle import upcycle

__all__ = [
    "ConversionError",
    "DistillConfig",
    "dense_ffn_layers",
    "distill",
    "ffn_flops_per_token",
    "mean_pool",
    "moe_flops_per_token",
    "moebert",
    "neuron_importance",
    "refit_experts",
    "split_neurons",
    "upcycle",
]
