"""Fine-tuning: LoRA / QLoRA / full on top of train/, with PEFT-format adapters."""
