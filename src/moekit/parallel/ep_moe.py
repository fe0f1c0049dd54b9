"""`EPMoE`: the MoE layer with its experts split over the ranks of an EP group.

Shape legend: T tokens on this rank, D d_model, E experts, El = E/ep experts on this rank,
K assignments per token, N = T*K, S assignments this rank sends (kept, sorted by expert),
R rows this rank receives, B sequences, L tokens per sequence, X = E * slots per expert.

One forward, token choice (Lepikhin et al. 2020 section 3.2 for the all-to-all pattern):

  1. route the local tokens with the (replicated) router;
  2. decide which assignments survive (capacity over the global batch, parallel/routing.py);
  3. sort the kept assignments by expert (= by destination rank, experts are contiguous);
  4. exchange per-expert counts (all-to-all of E int64), then the rows themselves
     (variable-size all-to-all, backward = the reverse exchange);
  5. regroup the received rows by local expert and run `Experts.forward_grouped`;
  6. send the outputs back by the inverse all-to-all and combine them with the gate weights.

Expert choice takes the global per-expert top-C (parallel/routing.py) and then exchanges like
token choice; Soft MoE mixes slots within each rank's sequences and exchanges the slots.
Auxiliary losses and metrics are reduced over the global batch (parallel/losses.py).

Equivalence contract (what the tests check): with the same weights, the outputs on rank r,
the aux loss, the metrics and the gradients equal those of the single-process `MoE` applied to
the concatenation along dim 0 of every rank's input, where the loss on rank r is its task loss
plus the (replicated) aux loss and gradients are summed over ranks and divided by the world size
(what DDP's averaging does). Sequences never span ranks (they are each rank's second-to-last
input dim). Random routing draws (noisy top-k noise, GShard's random second expert, Switch
jitter) come from each rank's own generator, so they match the single process in
distribution, not draw for draw.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor, nn

from moekit.layers.capacity import CausalState
from moekit.layers.dispatch import DispatchStats
from moekit.layers.metrics import empty_metrics
from moekit.layers.moe import MoE, MoEOutput
from moekit.layers.routers import ExpertChoice, SoftRouting, TokenChoice
from moekit.ops.permute import expert_counts
from moekit.parallel import comm
from moekit.parallel.global_batch import GlobalBatch
from moekit.parallel.losses import global_aux_loss, global_metrics, rule_for
from moekit.parallel.mesh import Mesh, check_divisible
from moekit.parallel.routing import expert_choice_select, token_choice_keep
from moekit.parallel.sharding import shard_experts_, shard_range


class EPMoE(MoE):
    """An `MoE` whose experts live on the ranks of `mesh.ep_group` (El = E/ep each).

    Built from a full `MoE` (the same on every rank), whose modules it takes over: the router
    and shared expert are kept (replicated), the experts are cut in place to this rank's shard
    (parallel/sharding.py), so parameter objects, names, order and state-dict keys are those
    of the `MoE`, with the expert dimension cut to El. See parallel/checkpoint.py for full
    checkpoints.

    `out.routing` is this rank's router output (with the global aux loss and loss terms); for
    expert choice it is the selection this rank computed (all groups, or its own groups when
    they are rank-local), with token ids indexing the global batch.
    """

    def __init__(self, moe: MoE, mesh: Mesh, name: str = ""):
        nn.Module.__init__(self)
        if not isinstance(moe, MoE):
            raise TypeError(f"EPMoE wraps an MoE, got {type(moe).__name__}")
        cfg = moe.cfg
        check_divisible(cfg.num_experts, mesh.ep, name or "an MoE layer")
        rule_for(moe.router)  # refuses a router class whose losses have no global rule
        self.cfg = cfg
        self.router = moe.router  # same registration order as MoE: router, experts, shared
        self.experts = shard_experts_(moe.experts, mesh.ep_rank, mesh.ep)
        self.shared_expert = moe.shared_expert
        self.mesh = mesh
        self.expert_range = shard_range(cfg.num_experts, mesh.ep_rank, mesh.ep)

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_range)

    def extra_repr(self) -> str:
        r = self.expert_range
        mesh = self.mesh
        return f"experts {r.start}..{r.stop - 1} of {self.cfg.num_experts} on ep_rank {mesh.ep_rank}/{mesh.ep}"

    # ------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, mask: Tensor | None = None, state: CausalState | None = None) -> MoEOutput:
        self._check_input(x)
        cfg, mesh = self.cfg, self.mesh
        if self._token_mask(x, mask)[0] is not None:
            raise ValueError("EPMoE does not take padding masks yet (some tokens are padding): run the padded "
                             "batch without expert parallelism (parallel.ep=1), or pack it without padding")
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        x_TD = x.reshape(-1, cfg.d_model)
        batch = GlobalBatch.gather(x_TD.shape[0], mesh.stats_group, x.device)
        if batch.total == 0:  # every rank agrees, so no rank enters a collective below
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return MoEOutput(x.new_zeros(x.shape) + zero.to(x.dtype), zero.float(),
                             empty_metrics(cfg.num_experts, x.device))
        with torch.autocast(x.device.type, enabled=False):
            xc_TD = x_TD.to(self._compute_dtype(x))
            if self.router.kind == "expert":
                y_TD, stats, routing, logits_TX = self._expert_choice(x_TD, xc_TD, batch)
            else:
                routing = self._route(x_TD, seq_len, batch)
                if isinstance(routing, TokenChoice):
                    y_TD, stats = self._token_choice(xc_TD, routing, batch, seq_len, state)
                    logits_TX = routing.logits_TE
                elif isinstance(routing, SoftRouting):
                    y_TD, stats = self._soft(xc_TD, routing)
                    logits_TX = routing.logits_BLX.reshape(x_TD.shape[0], routing.logits_BLX.shape[-1])
                else:  # pragma: no cover - a new routing kind must be wired here
                    raise TypeError(f"EPMoE: unsupported routing output {type(routing).__name__}")
            if self.shared_expert is not None:
                y_TD = y_TD + self.shared_expert(xc_TD).float()
        aux, losses = global_aux_loss(self.router, routing, logits_TX, x_TD, seq_len, batch)
        routing.aux_loss, routing.losses = aux, losses
        metrics = global_metrics(routing.probs_TE, stats, losses, batch)
        return MoEOutput(y_TD.to(x.dtype).view(x.shape), aux, metrics, routing)

    def _call_router(self, x_TD: Tensor, seq_len: int):
        if x_TD.shape[0]:
            return self.router(x_TD, max(seq_len, 1))
        # A rank without tokens still takes part in every collective. Routers are written for
        # T >= 1 (the single-process layer returns early on T = 0; Soft MoE cannot reshape an
        # empty batch), so route one zero token and keep none of it: every per-token field is
        # sliced to zero rows, still connected to the router's parameters.
        routing = self.router(x_TD.new_zeros(1, x_TD.shape[1]), 1)
        for f in fields(routing):
            value = getattr(routing, f.name)
            if isinstance(value, Tensor) and value.dim() > 0:
                setattr(routing, f.name, value[:0])
        return routing

    def _route(self, x_TD: Tensor, seq_len: int, batch: GlobalBatch):
        routing = self._call_router(x_TD, seq_len)
        if self.router.tracks_load:
            # DeepSeek-V3's bias update must see the global load, or the ranks' biases drift apart.
            local_E = expert_counts(routing.expert_idx_TK.reshape(-1), self.cfg.num_experts).float()
            self.router.observe_load(batch.sum_nograd(local_E))
        return routing

    # ------------------------------------------------------------------------- exchange

    def _zero_from_experts(self, like: Tensor) -> Tensor:
        """A zero-size tensor connected to the expert parameters (or to `like`).

        A rank that receives no rows still has to run the combine all-to-all's backward, which
        autograd only does when the exchanged tensor requires grad; see `_exchange`.
        """
        out = like[:, :0].sum(dim=1, keepdim=True).expand(like.shape[0], self.cfg.d_model) * 0.0
        for p in self.experts.parameters():
            if p.requires_grad:
                out = out + p.reshape(-1)[:0].sum()
                break
        return out

    def _exchange(self, rows_SD: Tensor, counts_E: Tensor) -> Tensor:
        """Run every row through its expert wherever that expert lives; rows sorted by expert,
        `counts_E` rows per (global) expert. Returns the outputs in the same order."""
        mesh = self.mesh
        ep, num_local = mesh.ep, self.num_local_experts
        group = mesh.ep_group
        counts_E = counts_E.to(torch.int64)
        # Split sizes first (one small all-to-all), so both sides know the payload layout.
        recv_counts_PE = comm.exchange_counts(counts_E, group).view(ep, num_local)  # (source, local expert)
        send_splits = counts_E.view(ep, num_local).sum(dim=1).tolist()
        recv_splits = recv_counts_PE.sum(dim=1).tolist()
        x_recv_RD = comm.all_to_all(rows_SD, send_splits, recv_splits, group, "dispatch")
        # Received rows are source-major; the grouped GEMM wants them expert-major.
        expert_R = torch.repeat_interleave(
            torch.arange(num_local, device=rows_SD.device).repeat(ep), recv_counts_PE.reshape(-1)
        )
        order_R = torch.argsort(expert_R, stable=True)
        num_recv = int(sum(recv_splits))
        if num_recv == 0:
            y_recv_RD = self._zero_from_experts(x_recv_RD)
        else:
            offs_E = torch.cumsum(recv_counts_PE.sum(dim=0), dim=0).to(torch.int32)
            y_sorted_RD = self.experts.forward_grouped(x_recv_RD[order_R], offs_E, expert_R[order_R])
            inverse_R = torch.empty_like(order_R)
            inverse_R[order_R] = torch.arange(num_recv, device=order_R.device)
            y_recv_RD = y_sorted_RD[inverse_R]
        return comm.all_to_all(y_recv_RD, recv_splits, send_splits, group, "combine")

    # ------------------------------------------------------------------------- routing kinds

    def _token_choice(self, x_TD: Tensor, routing: TokenChoice, batch: GlobalBatch, seq_len: int,
                      state: CausalState | None) -> tuple[Tensor, DispatchStats]:
        num_tokens, d_model = x_TD.shape
        num_experts = self.cfg.num_experts
        k = routing.expert_idx_TK.shape[1]
        expert_N = routing.expert_idx_TK.reshape(-1)
        keep_N = token_choice_keep(routing, self.cfg, batch, self.training, seq_len, state)
        kept_S = keep_N.nonzero().squeeze(1)
        sent_S = kept_S[torch.argsort(expert_N[kept_S], stable=True)]  # kept assignments by expert
        counts_E = expert_counts(expert_N[sent_S], num_experts)
        y_SD = self._exchange(x_TD[sent_S // k], counts_E)
        y_SD = y_SD.float() * routing.weight_TK.reshape(-1).float()[sent_S].unsqueeze(-1)
        # Dropped or declined assignments contribute zero rows; the K rows of a token are summed
        # in float32 in choice order, as the single-process dispatch does.
        y_ND = torch.zeros(num_tokens * k, d_model, device=x_TD.device).index_copy(0, sent_S, y_SD)
        out_TD = y_ND.view(num_tokens, k, d_model).sum(dim=1)
        if routing.active_TK is None:
            offered = torch.tensor(float(expert_N.numel()), device=x_TD.device)
        else:
            offered = routing.active_TK.float().sum()
        tokens_per_expert = counts_E.float()
        return out_TD, DispatchStats(tokens_per_expert, offered - tokens_per_expert.sum(), offered)

    def _expert_choice(self, x_TD: Tensor, xc_TD: Tensor, batch: GlobalBatch):
        # The router's logits (ExpertChoiceRouter: softmax over experts of a float32 gate); its
        # per-expert top-C is taken over the global batch, not this rank's tokens.
        cfg = self.cfg
        logits_TE = self.router.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        token_idx_EC, slots_per_expert = expert_choice_select(probs_TE, cfg, batch, self.training)
        num_tokens, d_model = xc_TD.shape
        # Slots (expert-major) whose token lives on this rank.
        mine_EC = (token_idx_EC >= batch.offset) & (token_idx_EC < batch.offset + num_tokens)
        expert_EC = torch.arange(cfg.num_experts, device=x_TD.device).unsqueeze(1).expand_as(token_idx_EC)
        token_S = token_idx_EC[mine_EC] - batch.offset
        expert_S = expert_EC[mine_EC]
        counts_E = expert_counts(expert_S, cfg.num_experts)
        y_SD = self._exchange(xc_TD[token_S], counts_E)
        weight_S = probs_TE[token_S, expert_S]
        out_TD = torch.zeros(num_tokens, d_model, device=x_TD.device).index_add(
            0, token_S, y_SD.float() * weight_S.unsqueeze(-1)
        )
        taken_T = torch.zeros(num_tokens, device=x_TD.device).index_fill_(0, token_S, 1.0)
        offered = torch.tensor(float(num_tokens), device=x_TD.device)
        # The slot count is already global: rank 0 alone contributes it to the global sum.
        tokens_per_expert = torch.full((cfg.num_experts,), float(slots_per_expert if batch.rank == 0 else 0),
                                       device=x_TD.device)
        stats = DispatchStats(tokens_per_expert, offered - taken_T.sum(), offered)
        routing = ExpertChoice(logits_TE, probs_TE, token_idx_EC, self._global_weights(probs_TE, token_idx_EC, batch))
        return out_TD, stats, routing, logits_TE

    @torch.no_grad()
    def _global_weights(self, probs_TE: Tensor, token_idx_EC: Tensor, batch: GlobalBatch) -> Tensor:
        """Combine weights of the selected slots where this rank holds the token, 0 elsewhere
        (for inspection only; the differentiable weights are taken from local probabilities)."""
        mine = (token_idx_EC >= batch.offset) & (token_idx_EC < batch.offset + probs_TE.shape[0])
        local = (token_idx_EC - batch.offset).clamp(0, max(probs_TE.shape[0] - 1, 0))
        expert = torch.arange(token_idx_EC.shape[0], device=probs_TE.device).unsqueeze(1).expand_as(token_idx_EC)
        if probs_TE.shape[0] == 0:
            return torch.zeros(token_idx_EC.shape, device=probs_TE.device)
        return torch.where(mine, probs_TE[local, expert], 0.0)

    def _soft(self, x_TD: Tensor, routing: SoftRouting) -> tuple[Tensor, DispatchStats]:
        # Puigcerver et al. 2023: slots are mixes of one sequence's tokens, so each rank forms
        # the slots of its own sequences and only the slots travel (B * S rows per expert).
        num_tokens, d_model = x_TD.shape
        num_seq, seq_len, num_slots = routing.dispatch_BLX.shape
        num_experts = self.cfg.num_experts
        per_expert = num_slots // num_experts
        x_BLD = x_TD.view(num_seq, seq_len, d_model)
        slots_BXD = torch.einsum("bld,blx->bxd", x_BLD.float(), routing.dispatch_BLX)  # (B, X, D)
        # (B, E, S, D) -> (E, B*S, D): expert-major rows, B*S per expert.
        slots_ECD = slots_BXD.view(num_seq, num_experts, per_expert, d_model).transpose(0, 1)
        rows = slots_ECD.reshape(num_experts * num_seq * per_expert, d_model).to(x_TD.dtype)
        counts_E = torch.full((num_experts,), num_seq * per_expert, dtype=torch.int64, device=x_TD.device)
        y_rows = self._exchange(rows, counts_E)
        y_BXD = y_rows.view(num_experts, num_seq, per_expert, d_model).transpose(0, 1)
        y_BXD = y_BXD.reshape(num_seq, num_slots, d_model)  # (B, X, D)
        out_BLD = torch.einsum("blx,bxd->bld", routing.combine_BLX, y_BXD.float())
        zero = torch.zeros((), device=x_TD.device)
        return out_BLD.reshape(num_tokens, d_model), DispatchStats(counts_E.float(), zero, zero + num_tokens)
