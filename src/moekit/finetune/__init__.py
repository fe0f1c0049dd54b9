"""moekit.finetune: LoRA, QLoRA and full fine-tuning on top of moekit.train (re-exports only).

    from moekit.finetune import FinetuneData, read_examples
"""

from moekit.finetune.data import FinetuneData, read_examples

__all__ = ["FinetuneData", "read_examples"]
