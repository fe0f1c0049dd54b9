"""parallelize: DDP for dense weights, expert gradients over the dp replicas of a shard, global
gradient clipping, and checkpoints in the single-process layout in both directions."""

import _dp_cases as D
import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_two_steps_ep2_equal_single_process(pool2, router):
    # (B, L) batches of whole sequences: DeepSeek's loss is per sequence.
    result = pool2.run(D.train_parity, dp=1, ep=2, shapes=[(1, 3), (2, 3)], router=router)
    assert result[0]["clipped"]  # the global clip factor was exercised


@pytest.mark.parametrize("dp,ep", [(1, 4), (2, 2), (4, 1)])
def test_four_ranks_any_mesh(pool4, dp, ep):
    pool4.run(D.train_parity, dp=dp, ep=ep, shapes=[(3,), (2,), (4,), (1,)])


@pytest.mark.parametrize("no_sync", [False, True])
def test_gradient_accumulation(pool4, no_sync):
    pool4.run(D.train_parity, dp=2, ep=2, shapes=[(2,), (3,), (1,), (2,)], accum=2, no_sync=no_sync)


def test_capacity_training(pool2):
    pool2.run(D.train_parity, dp=1, ep=2, shapes=[(4,), (5,)], cfg={"capacity_factor": 0.75})


@pytest.mark.parametrize("dp,ep", [(1, 2)])
def test_checkpoint_roundtrip_two_ranks(pool2, tmp_path, dp, ep):
    pool2.run(D.checkpoint_roundtrip, dp=dp, ep=ep, path=str(tmp_path / "ckpt.pt"))


def test_checkpoint_roundtrip_dp2_ep2(pool4, tmp_path):
    pool4.run(D.checkpoint_roundtrip, dp=2, ep=2, path=str(tmp_path / "ckpt.pt"))
