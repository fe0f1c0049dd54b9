"""Fine-tuning: LoRA / QLoRA / full on top of train/, with PEFT-format adapters (re-exports only).

    from moekit.finetune import finetune, load_finetuned
    report = finetune("runs/base", "data.jsonl", "lora", "runs/ft", sets=["lora.rank=8"])
    model = load_finetuned("runs/ft")
"""

from moekit.finetune.data import FinetuneData, read_examples
from moekit.finetune.job import finetune, load_finetuned
from moekit.finetune.lora import LoraSpec, apply_lora, merge_lora, quantize_base, trainable_summary

__all__ = ["FinetuneData", "LoraSpec", "apply_lora", "finetune", "load_finetuned", "merge_lora", "quantize_base",
           "read_examples", "trainable_summary"]
