"""Adaptive mixtures of local experts (Jacobs, Jordan, Nowlan and Hinton, Neural Computation 3(1),
1991): a softmax gate over small expert networks, for regression and classification on tabular
data.

Shape legend: T rows (samples), I input features, E experts, H expert hidden width, O outputs
(regression targets or classes).

The gate is moekit's `dense` router (softmax over all experts, every expert runs on every row),
so it shares the layer's float32 gating and its optional importance loss. The experts are not a
`MoE` layer because the 1991 model needs what the layer does not give: each expert's own output
(the loss below scores every expert separately) in an output space of its own (O != I).

Loss (section 1, eq. 1.3): the negative log-likelihood of a mixture,
    regression:      -log sum_i p_i exp(-||d - o_i||^2 / 2)
    classification:  -log sum_i p_i softmax(o_i)[y]
which makes experts compete for each case instead of cooperating (the blended loss
||d - sum_i p_i o_i||^2 of their eq. 1.1 couples them; `loss="blend"` offers it for comparison).
Prediction is the mixture's mean, sum_i p_i o_i (regression), or its class distribution,
sum_i p_i softmax(o_i) (classification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.routers import ROUTERS
from moekit.models import common

TASKS = ("regression", "classification")
LOSSES = ("mixture", "blend")
EXPERT_ACTIVATIONS = ("tanh", "relu")


@dataclass
class LocalExpertsConfig:
    in_features: int = 8
    out_features: int = 1  # regression targets, or the number of classes
    task: str = "regression"
    num_experts: int = 4
    expert_hidden: int = 16  # 0 = linear experts
    activation: str = "tanh"
    loss: str = "mixture"
    gate_aux_loss_coef: float = 0.0  # importance CV^2 on the gate (Shazeer et al. 2017); 0 = none, as in 1991
    init_std: float = 0.3
    preset: str | None = None

    def __post_init__(self):
        own = "LocalExpertsConfig"
        common.check_int(own, "in_features", self.in_features, 1)
        common.check_int(own, "out_features", self.out_features, 1)
        common.check_choice(own, "task", self.task, TASKS)
        if self.task == "classification" and self.out_features < 2:
            raise ValueError(f"{own}.out_features is the number of classes for classification and must be >= 2, "
                             f"got {self.out_features}")
        common.check_int(own, "num_experts", self.num_experts, 1)
        common.check_int(own, "expert_hidden", self.expert_hidden, 0)
        common.check_choice(own, "activation", self.activation, EXPERT_ACTIVATIONS)
        common.check_choice(own, "loss", self.loss, LOSSES)
        common.check_float(own, "gate_aux_loss_coef", self.gate_aux_loss_coef, strict=False)
        common.check_float(own, "init_std", self.init_std)

    @property
    def gate_config(self) -> MoEConfig:
        return MoEConfig(d_model=self.in_features, d_ff=1, num_experts=self.num_experts, top_k=self.num_experts,
                         router="dense", aux_loss_coef=self.gate_aux_loss_coef)


@dataclass
class LocalExpertsOutput:
    prediction: Tensor  # (T, O) mixture mean (regression) or class probabilities (classification)
    gate_probs: Tensor  # (T, E)
    expert_outputs: Tensor  # (T, E, O) each expert's output (logits for classification)
    aux_loss: Tensor
    layer_metrics: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    loss: Tensor | None = None  # task_loss + aux_loss
    task_loss: Tensor | None = None


class LocalExperts(nn.Module):
    """Stacked small expert networks and a dense softmax gate: `model(x, labels=None)`."""

    def __init__(self, cfg: LocalExpertsConfig):
        super().__init__()
        if not isinstance(cfg, LocalExpertsConfig):
            raise TypeError(f"LocalExperts expects a LocalExpertsConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.gate = ROUTERS["dense"](cfg.gate_config)
        E, I, H, O = cfg.num_experts, cfg.in_features, cfg.expert_hidden, cfg.out_features
        if H > 0:
            # Unit-variance pre-activations for standardised inputs: tanh starts in its linear range.
            self.w1 = nn.Parameter(torch.randn(E, H, I) / math.sqrt(I))  # (E, H, I)
            self.b1 = nn.Parameter(torch.zeros(E, H))
            self.w2 = nn.Parameter(torch.randn(E, O, H) * cfg.init_std)  # (E, O, H)
        else:
            self.register_parameter("w1", None)
            self.register_parameter("b1", None)
            self.w2 = nn.Parameter(torch.randn(E, O, I) * cfg.init_std)  # (E, O, I)
        self.b2 = nn.Parameter(torch.zeros(E, O))

    def experts(self, x_TI: Tensor) -> Tensor:
        h = x_TI[:, None, :].expand(-1, self.cfg.num_experts, -1)  # (T, E, I): every expert sees every row
        if self.w1 is not None:
            h = torch.einsum("tei,ehi->teh", h, self.w1) + self.b1
            h = torch.tanh(h) if self.cfg.activation == "tanh" else F.relu(h)
        return torch.einsum("teh,eoh->teo", h, self.w2) + self.b2  # (T, E, O)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> LocalExpertsOutput:
        cfg = self.cfg
        if x.dim() != 2 or x.shape[1] != cfg.in_features:
            raise ValueError(f"x must be (rows, in_features={cfg.in_features}), got {tuple(x.shape)}")
        x = x.float()
        routing = self.gate(x, x.shape[0])
        p_TE = routing.probs_TE  # float32 softmax over all experts
        o_TEO = self.experts(x)
        if cfg.task == "regression":
            prediction = (p_TE[..., None] * o_TEO).sum(dim=1)
        else:
            prediction = (p_TE[..., None] * o_TEO.softmax(dim=-1)).sum(dim=1)
        metrics = {
            "tokens_per_expert": p_TE.detach().sum(dim=0),  # soft load: gate mass per expert
            "router_entropy": -(p_TE * p_TE.clamp_min(1e-20).log()).sum(-1).mean().detach(),
        }
        out = LocalExpertsOutput(prediction, p_TE, o_TEO, routing.aux_loss, [(0, metrics)])
        if labels is not None:
            out.task_loss = self.task_loss(p_TE, o_TEO, prediction, labels)
            out.loss = out.task_loss + out.aux_loss
        return out

    def task_loss(self, p_TE: Tensor, o_TEO: Tensor, prediction: Tensor, labels: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.task == "regression":
            d_TO = labels.float().reshape(len(labels), -1)
            if cfg.loss == "blend":
                return 0.5 * (prediction - d_TO).pow(2).sum(-1).mean()
            sq_TE = (o_TEO - d_TO[:, None, :]).pow(2).sum(-1)  # ||d - o_i||^2
            return -torch.logsumexp(p_TE.clamp_min(1e-20).log() - 0.5 * sq_TE, dim=1).mean()  # eq. 1.3
        y_T = labels.long()
        if cfg.loss == "blend":
            return F.nll_loss(prediction.clamp_min(1e-12).log(), y_T)
        logp_TE = o_TEO.log_softmax(dim=-1).gather(2, y_T[:, None, None].expand(-1, cfg.num_experts, 1)).squeeze(-1)
        return -torch.logsumexp(p_TE.clamp_min(1e-20).log() + logp_TE, dim=1).mean()


def count_local_experts(cfg: LocalExpertsConfig) -> tuple[int, int]:
    """Every expert runs on every row (dense gate), so active equals total."""
    from moekit.models.common import router_params

    E, I, H, O = cfg.num_experts, cfg.in_features, cfg.expert_hidden, cfg.out_features
    expert = (H * I + H + O * H + O) if H > 0 else (O * I + O)
    total = router_params(cfg.gate_config) + E * expert
    return total, total


def describe_local_experts(cfg: LocalExpertsConfig) -> list[tuple[str, str]]:
    kind = f"MLP {cfg.in_features}->{cfg.expert_hidden}->{cfg.out_features} ({cfg.activation})" if cfg.expert_hidden \
        else f"linear {cfg.in_features}->{cfg.out_features}"
    return [("task", f"{cfg.task}, {cfg.loss} loss"), ("experts", f"{cfg.num_experts} x {kind}"),
            ("gate", f"dense softmax over {cfg.num_experts} experts (linear in the {cfg.in_features} inputs)")]
