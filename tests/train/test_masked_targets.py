"""Targets of -100 (not trained: a fine-tuning prompt, padding) in the trainer: the training loss
is the mean over trained targets, evaluation and the test evaluation score and count only them
(and their bytes); with nothing masked the numbers are exactly the LM trainer's. Also: a model
with most parameters frozen trains, checkpoints and resumes bit for bit, and a caller's files
written into each checkpoint are committed with it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from faults import Killed, kill_at
from trainkit import small_run

from moekit.train import checkpoint as ck
from moekit.train.loop import train
from moekit.train.steps import IGNORE, evaluate, lm_loss_sum, micro_lm_loss


class Masked:
    """`small_data` with some targets set to IGNORE: a pattern that moves with the step and the
    micro-batch, so micro-batches of one step hold different numbers of trained targets."""

    def __init__(self, data):
        self.data = data

    def __getattr__(self, name):
        return getattr(self.data, name)

    @staticmethod
    def mask(y_BL: torch.Tensor, salt: int) -> torch.Tensor:
        pos = torch.arange(y_BL.numel()).reshape(y_BL.shape)
        return torch.where((pos * 7 + salt) % (3 + salt % 4) == 0, y_BL, torch.full_like(y_BL, IGNORE))

    def train_batch(self, step, micro, grad_accum, rank=0, world=1):
        x_BL, y_BL = self.data.train_batch(step, micro, grad_accum, rank, world)
        return x_BL, self.mask(y_BL, step * 5 + micro)

    def val_batches(self, num_batches):
        return [(x, self.mask(y, i)) for i, (x, y) in enumerate(self.data.val_batches(num_batches))]


def test_micro_loss_without_masks_is_the_lm_loss_bit_for_bit():
    """count = every target, total = accum * count: the weight is exactly 1.0, so the value and
    the gradient equal the LM trainer's `lm_loss_sum / numel` (not merely close)."""
    for seed in range(20):
        torch.manual_seed(seed)
        logits_BLV = torch.randn(3, 7, 11, requires_grad=True)
        y_BL = torch.randint(0, 11, (3, 7))
        old = lm_loss_sum(logits_BLV, y_BL) / y_BL.numel()
        (g_old,) = torch.autograd.grad(old / 3, logits_BLV)
        new = micro_lm_loss(logits_BLV, y_BL, 21, 63, 3)
        (g_new,) = torch.autograd.grad(new / 3, logits_BLV)
        assert new.item() == old.item() and torch.equal(g_new, g_old), seed


def test_evaluate_scores_only_trained_targets_and_their_bytes():
    v = 7
    logits = [torch.randn(2, 4, v), torch.randn(1, 4, v)]
    targets = [torch.tensor([[1, IGNORE, 3, 4], [IGNORE, IGNORE, 6, 0]]), torch.tensor([[2, 2, IGNORE, 5]])]
    token_bytes = torch.tensor([1, 2, 3, 1, 2, 3, 4])  # (a real vocabulary's entry V-100 for a -100)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return SimpleNamespace(logits=logits[self.calls - 1])

    batches = [(torch.zeros_like(y), y) for y in targets]
    loss, bpb = evaluate(Fixed(), batches, token_bytes, torch.device("cpu"), torch.no_grad())
    nats, count, nbytes = 0.0, 0, 0
    for lg, y in zip(logits, targets, strict=True):
        logp = torch.log_softmax(lg.double(), -1)
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                if y[b, t] != IGNORE:
                    nats -= float(logp[b, t, y[b, t]])
                    count += 1
                    nbytes += int(token_bytes[y[b, t]])
    assert (count, nbytes) == (8, 19)
    assert loss == pytest.approx(nats / count, rel=1e-6)
    assert bpb == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)


def test_training_loss_is_the_mean_over_trained_targets(tmp_path, small_data):
    """Step 1's logged loss against a hand computation from the same initial weights: the
    cross-entropy summed over every trained target of both micro-batches, over their number,
    plus the mean auxiliary loss."""
    from moekit.models import build_model

    cfg = small_run("optim.grad_accum=2", "schedule.steps=1", "schedule.warmup_steps=0", "eval.test=false",
                    "checkpoint.at_end=false")
    data = Masked(small_data)
    result = train(cfg, tmp_path, data=data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).train()
    nats, count, aux = 0.0, 0, []
    with torch.no_grad():
        for micro in range(2):
            x_BL, y_BL = data.train_batch(0, micro, 2)
            out = model(x_BL)
            keep = y_BL != IGNORE
            nats += float(F.cross_entropy(out.logits[keep].double(), y_BL[keep], reduction="sum"))
            count += int(keep.sum())
            aux.append(float(out.aux_loss))
    counts = [int((data.train_batch(0, m, 2)[1] != IGNORE).sum()) for m in range(2)]
    assert counts[0] != counts[1] and 0 < count < 2 * x_BL.numel()  # the weighting is exercised
    assert result.losses[0] == pytest.approx(nats / count + sum(aux) / 2, rel=1e-7)  # float32 rounding


def _freeze_all_but_norms_and_experts_in(model_cfg):
    from moekit.models import build_model

    model = build_model(model_cfg)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name or name.endswith("experts.w_in"))
    return model


def test_frozen_model_trains_checkpoints_and_resumes_bit_identically(tmp_path, small_data):
    cfg = small_run()
    factory = _freeze_all_but_norms_and_experts_in
    full = train(cfg, tmp_path / "full", data=small_data, model_factory=factory)
    with pytest.raises(Killed):  # the same run killed after its step-3 checkpoint
        train(cfg, tmp_path / "cut", data=small_data, model_factory=factory, before_step=kill_at(4))
    resumed = train(cfg, tmp_path / "cut", data=small_data, model_factory=factory, resume=True)
    assert resumed.losses == full.losses[3:]
    a = ck.load_file_state(tmp_path / "full" / "checkpoints" / "step-00000006")
    b = ck.load_file_state(tmp_path / "cut" / "checkpoints" / "step-00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(cfg.seed)
    start = factory(cfg.model)
    trainable = {n for n, p in start.named_parameters() if p.requires_grad}
    assert 0 < len(trainable) < len(dict(start.named_parameters()))
    for name, p in start.named_parameters():  # frozen weights are untouched, the others moved
        assert torch.equal(p.detach(), a[name]) == (name not in trainable), name
    # The optimizer holds the trainable parameters only (and state for each of them).
    step6 = ck.verify(tmp_path / "full" / "checkpoints" / "step-00000006")
    assert sum(len(g["params"]) for g in step6.manifest["optimizer_param_groups"]) == len(trainable)
    moments = ck._load_tensors(step6.path / "optimizer.safetensors")
    assert len({k.split(".")[0] for k in moments}) == len(trainable)


def test_checkpoint_files_are_committed_and_hashed_with_the_checkpoint(tmp_path, small_data):
    seen = []

    def write(folder, model):
        assert folder.name.startswith(ck.TMP_PREFIX)  # before the rename that commits it
        seen.append(folder.name)
        (folder / "extra.txt").write_text(f"{sum(p.numel() for p in model.parameters())}\n")

    train(small_run(), tmp_path, data=small_data, checkpoint_files=write)
    steps = ck.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in steps] == [3, 6] and len(seen) == 2
    for _, folder in steps:
        assert "extra.txt" in ck.verify(folder).manifest["files"]
    (steps[-1][1] / "extra.txt").write_text("changed\n")
    with pytest.raises(ck.CheckpointError, match="extra.txt"):
        ck.verify(steps[-1][1])
