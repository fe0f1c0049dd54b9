"""A real trained tokenizer for tiny Hugging Face folders: a byte-level BPE (320 tokens) trained
with `tokenizers` on a few files of the Python standard library, with bos/eos/pad tokens, a bos
added by its post-processor (as Llama's tokenizers do) and a ChatML-style chat template, saved
with transformers' `PreTrainedTokenizerFast.save_pretrained`."""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS_TEXT, IM_START, IM_END = range(5)
VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE):
    """Train the tokenizer and save it into `folder`; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = os.path.dirname(os.__file__)
    texts = [Path(stdlib, name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "colorsys.py")]
    texts.append("Grüße, café, naïve, 日本語, emoji 🙂\n" * 3)  # multi-byte characters get merges too
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   chat_template=chat_template)
    assert len(fast) == VOCAB, len(fast)
    fast.save_pretrained(folder)
    return fast
