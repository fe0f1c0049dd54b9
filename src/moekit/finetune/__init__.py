"""Fine-tuning: LoRA / QLoRA / full on top of train/, with PEFT-format adapters (re-exports only).

    from moekit.finetune import finetune, load_finetuned
    report = finetune("runs/base", "data.jsonl", "lora", "runs/ft", sets=["lora.rank=8"])
    model = load_finetuned("runs/ft")
"""

from moekit.finetune.data import FinetuneData, read_examples
from moekit.finetune.job import finetune, load_finetuned

__all__ = ["FinetuneData", "finetune", "load_finetuned", "read_examples"]
