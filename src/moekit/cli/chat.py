"""`moekit chat`: talk to a chat model from the terminal, its reply printed as it is generated.

    moekit chat --checkpoint hf-folder [--system "You are terse."] [--max-new-tokens 256]
    printf 'Hello\\nAnd then?\\n' | moekit chat --checkpoint hf-folder --json

Each line read from stdin is a user message; the whole conversation so far (system message,
user and assistant turns) goes through the folder's chat template with the assistant's turn
opened, exactly as `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders
it, and the reply is generated until an eos token (generation_config.json / config.json
eos_token_id) or `--max-new-tokens`. Its text is printed piece by piece as tokens come (decoded
incrementally, so a character split over several tokens is printed whole) and joins the history
as the assistant's message (special tokens left out). `/exit` or the end of input ends the chat,
`/reset` forgets the conversation. `--json` prints one JSON object per turn instead (prompt ids,
reply ids, text): the form for scripts and tests.

The checkpoint needs a Hugging Face tokenizer with a chat template (tokenizer_config.json
"chat_template" or chat_template.jinja); without one this is an error before any weight is
read: use `moekit generate --prompt` for plain continuation. A turn that would not fit the
model's context is refused with one line on stderr and left out of the history (exit status 2 at
the end); `/reset` starts over.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moekit.cli.common import CHECKPOINT_HELP, check_context, no_tokenizer_error
from moekit.cli.generate import add_model_arguments, chat_messages, check_quant_args, load_lm, open_lm, stop_ids
from moekit.tokenizer import StreamDecoder

HELP = "chat with a model through its chat template, the reply streamed as it is generated"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH", required=True, help=CHECKPOINT_HELP)
    add_model_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per turn (prompt_ids, reply_ids, text) instead of streaming text")


def _check_chat_tokenizer(tok, folder) -> None:
    if tok is None:
        raise no_tokenizer_error(folder)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{folder} has no chat template (tokenizer_config.json \"chat_template\" or "
                         f"chat_template.jinja); use `moekit generate --prompt` for plain continuation")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_quant_args(args)
    ref, cfg, tok, eos = open_lm(args)
    _check_chat_tokenizer(tok, ref.path)
    model = load_lm(args, ref, cfg)
    stops = set(stop_ids(args, eos))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    history: list[dict] = chat_messages("", args.system)[:-1]  # the system message, if any
    status = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not text.strip():
            continue
        messages = [*history, {"role": "user", "content": text}]
        prompt = tok.apply_chat_template(messages)
        try:
            check_context(cfg, [len(prompt)], args.max_new_tokens)
        except ValueError as err:
            print(f"moekit chat: error: the conversation: {err}; /reset starts over", file=sys.stderr)
            status = 2
            continue
        reply = _reply(model, tok, prompt, stops, args, generator, stream=not args.json)
        body = [i for i in reply if i not in stops]
        answer = tok.decode(body, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt_ids": prompt, "reply_ids": reply, "text": answer}), flush=True)
        history = [*messages, {"role": "assistant", "content": answer}]
    return status


def _reply(model, tok, prompt: list[int], stops: set[int], args, generator, stream: bool) -> list[int]:
    """Generate one reply (its ids, the stop token included); with `stream`, print its text as it comes."""
    reply: list[int] = []
    decoder = StreamDecoder(tok, skip_special_tokens=True)

    def on_token(token_B):
        t = int(token_B[0])
        reply.append(t)
        if stream and t not in stops:
            piece = decoder.push([t])
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()

    model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_tokens=stops, use_cache=not args.no_cache, generator=generator,
                   streamer=on_token)
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
    return reply
