"""Fine-tuning: LoRA / QLoRA / full on top of train/, with PEFT-format adapters (re-exports only).

    from moekit.finetune import FinetuneData, read_examples
"""

from moekit.finetune.data import FinetuneData, read_examples

__all__ = ["FinetuneData", "read_examples"]
