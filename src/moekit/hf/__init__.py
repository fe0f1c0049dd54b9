"""moekit.hf: Hugging Face checkpoints <-> moekit decoder models, with logit parity.

    from moekit.hf import from_hf, to_hf
    model = from_hf("path/to/hf_folder")              # config.json + safetensors (sharded or not)
    to_hf(model, "out_folder", max_shard_size="5GB")   # AutoModelForCausalLM.from_pretrained loads it

One file per family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, llama, qwen2), each a
declarative key map plus a config translator both ways; see docs/hf.md.
"""

from moekit.hf.api import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    from_hf,
    read_hf_config,
    to_hf,
)
from moekit.hf.common import NotRepresentable
from moekit.hf.shards import CheckpointError

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "NotRepresentable",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "read_hf_config",
    "to_hf",
]
