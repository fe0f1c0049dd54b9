"""Build a tiny Hugging Face folder to try `moekit generate` and `moekit chat` on: a Qwen3-MoE
model with random weights (transformers' own class, `save_pretrained`) and a real tokenizer, a
byte-level BPE of 320 tokens trained on a few files of the Python standard library, with bos,
eos and pad tokens and a ChatML chat template. No network: everything is built here.

    python examples/tiny_hf_chat_folder.py runs/tiny-hf-chat
    moekit generate --checkpoint runs/tiny-hf-chat --prompt "def main(" --max-new-tokens 12
    echo "Hello!" | moekit chat --checkpoint runs/tiny-hf-chat --max-new-tokens 12

The model is trained for a minute on the same files (--train-steps), so its text looks like
Python, not like an answer: the folder shows the machinery (tokenizer, bos, chat template, eos,
streaming) on the layout a real checkpoint has, not a model worth talking to.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_texts() -> list[str]:
    stdlib = os.path.dirname(os.__file__)
    return [Path(stdlib, name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py", "colorsys.py")]


def train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = stdlib_texts()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS,
        show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # bos
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


def fit(model, tok, steps: int, seq: int = 128, batch: int = 8) -> None:
    """A little next-token training on the same standard-library files (AdamW, fixed seed)."""
    import torch

    text = "".join(stdlib_texts())
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--train-steps", type=int, default=150,
                        help="next-token training steps on the tokenizer's own text, so the output looks like "
                             "Python rather than noise (0 = random weights; default 150, about a minute on 2 cores)")
    args = parser.parse_args()
    import torch
    import transformers as T

    tok = train_tokenizer()
    cfg = T.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                           num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                           pad_token_id=0, bos_token_id=1, eos_token_id=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = T.Qwen3MoeForCausalLM(cfg)
    if args.train_steps:
        fit(model, tok, args.train_steps)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {', '.join(sorted(p.name for p in Path(args.out).iterdir()))}")


if __name__ == "__main__":
    main()
