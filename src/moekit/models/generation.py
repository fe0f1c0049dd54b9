"""Autoregressive generation for the decoder LM: greedy, temperature, top-k and nucleus (top-p)
sampling, stop tokens, and a batch of prompts of different lengths (left padding).

Shape legend: B prompts, L prompt length (padded), V vocab.

With `use_cache=True` the prompt runs once and each new token attends to cached keys/values;
with `use_cache=False` the whole sequence is recomputed each step. Both feed the model the same
positions and padding mask, so they produce the same tokens (tests/models check this).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[Tensor, Tensor]:
    """A list of token lists -> (input_ids (B, L), attention_mask (B, L)), padded on the left so
    every prompt's last token sits in the last column, where the next token is read."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("input_ids: generate needs at least one prompt and every prompt at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


def filter_logits(logits_BV: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability
    reaches top_p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration")."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p
        drop_BV = drop_sorted.scatter(1, order_BV, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def next_token(logits_BV: Tensor, temperature: float, top_k, top_p, generator) -> Tensor:
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = filter_logits(logits_BV.float() / temperature, top_k, top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _positions(mask_BS: Tensor) -> Tensor:
    """Position of each token counting only real tokens: left padding does not shift positions
    (the convention of `transformers`' generate), so a prompt means the same padded or not."""
    return (mask_BS.cumsum(dim=-1) - 1).clamp_min(0)


def _check_prompts(input_ids: Tensor, attention_mask: Tensor | None, vocab: int) -> None:
    """Refuse prompts the model cannot embed, naming the argument, before any forward pass (torch
    would fail deep inside the embedding or the attention, or index out of range on CUDA)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids must hold at least one prompt of at least one token, got shape {tuple(input_ids.shape)}"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids holds token id {bad}; ids must be in [0, {vocab}) (vocab_size={vocab})")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match")
        empty = (attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask: prompt(s) {empty[:5]} have no real token; each needs at least one")


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor | Sequence[Sequence[int]],
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], object] | None = None,
) -> Tensor:
    """Continue each prompt; returns (B, L + n) token ids, n <= max_new_tokens.

    temperature 0 is greedy decoding. A sequence that emits a stop token is finished: it keeps
    the stop token and is padded with `pad_token_id` afterwards; generation ends when every
    sequence has finished or after max_new_tokens. The model runs in eval mode (restored after).

    streamer: called after each step with that step's tokens (B,) (a finished sequence's are
    `pad_token_id`), e.g. to print text as it is produced (`moekit chat`); without one, no step
    pays for it. Generation stops early when it returns True.
    """
    cfg = model.cfg
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    device = next(model.parameters()).device
    vocab = cfg.vocab_size
    try:
        pad_token_id = operator.index(pad_token_id)
    except TypeError:
        pad_token_id = None
    if pad_token_id is None or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (vocab_size={vocab})")
    if not isinstance(input_ids, Tensor):
        input_ids, attention_mask = left_pad(input_ids, pad_token_id, device)
    _check_prompts(input_ids, attention_mask, vocab)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"max_seq_len={cfg.max_seq_len}"
        )
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    ids_BS, mask_BS = input_ids.to(device), attention_mask.to(device).long()
    finished_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache() if use_cache else None
        for step in range(max_new_tokens):
            if cache is None or step == 0:  # full sequence: every step without cache, the prompt with it
                out = model(ids_BS, attention_mask=mask_BS, position_ids=_positions(mask_BS), cache=cache,
                            last_logits_only=True)
            else:
                out = model(ids_BS[:, -1:], attention_mask=mask_BS, position_ids=_positions(mask_BS)[:, -1:],
                            cache=cache, last_logits_only=True)
            token_B = next_token(out.logits[:, -1].float(), float(temperature), top_k, top_p, generator)
            token_B = torch.where(finished_B, torch.full_like(token_B, pad_token_id), token_B)
            ids_BS = torch.cat((ids_BS, token_B[:, None]), dim=1)
            mask_BS = torch.cat((mask_BS, torch.ones_like(token_B)[:, None]), dim=1)
            if stop.numel():
                finished_B |= torch.isin(token_B, stop)
            if streamer is not None and streamer(token_B) is True:
                break
            if stop.numel() and bool(finished_B.all()):
                break
    finally:
        model.train(was_training)
    return ids_BS
