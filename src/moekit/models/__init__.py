"""moekit.models: models built from the MoE layer, their presets and the shared model API.

    from moekit.models import get_preset, list_presets, build_model, count_parameters, dense_twin
    cfg = get_preset("tiny")                  # a config dataclass
    model = build_model(cfg)                  # an nn.Module
    out = model(input_ids, labels=labels)     # .logits .aux_loss .layer_metrics .loss .lm_loss
    total, active = count_parameters(cfg)     # analytic; count_parameters(model) counts tensors
    twin = dense_twin(cfg, match="active")    # dense config with matched parameters
"""

from moekit.models import decoder, encoder, mole, vision, widenet  # noqa: F401  (register archs and presets)
from moekit.models.decoder import DecoderConfig, DecoderLM, DecoderOutput, KVCache, MLAConfig
from moekit.models.encoder import (
    EncoderBackbone,
    EncoderBackboneConfig,
    EncoderClassifier,
    EncoderConfig,
    EncoderOutput,
)
from moekit.models.io import load_checkpoint, save_checkpoint, save_model_checkpoint
from moekit.models.mole import LocalExperts, LocalExpertsConfig, LocalExpertsOutput
from moekit.models.registry import (
    ARCHS,
    PRESETS,
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
    dense_twin,
    get_preset,
    list_presets,
    register_preset,
)
from moekit.models.vision import VisionClassifier, VisionConfig, VisionOutput
from moekit.models.widenet import WideNet, WideNetConfig

__all__ = [
    "ARCHS",
    "PRESETS",
    "DecoderConfig",
    "DecoderLM",
    "DecoderOutput",
    "EncoderBackbone",
    "EncoderBackboneConfig",
    "EncoderClassifier",
    "EncoderConfig",
    "EncoderOutput",
    "LocalExperts",
    "LocalExpertsConfig",
    "LocalExpertsOutput",
    "VisionClassifier",
    "VisionConfig",
    "VisionOutput",
    "WideNet",
    "WideNetConfig",
    "KVCache",
    "MLAConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
    "dense_twin",
    "get_preset",
    "list_presets",
    "load_checkpoint",
    "register_preset",
    "save_checkpoint",
    "save_model_checkpoint",
]
