import math

import pytest
import torch
import torch.nn.functional as F

from spin_ray.data import pad_pairs
from spin_ray.loss import sequence_logps, spin_loss


def official(pi_real, pi_gen, ref_real, ref_gen, beta, loss_type):
    """The formulas of the official SPIN trainer (spin/alignment/trainer.py, spin_loss)."""
    pi_logratios = pi_real - pi_gen
    ref_logratios = ref_real - ref_gen
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # IPO as in TRL's DPOTrainer
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pi_real - ref_real), beta * (pi_gen - ref_gen)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_matches_official_formulas(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(64, generator=g, dtype=torch.float64) * 20 - 50 for _ in range(4)]
    ours = spin_loss(*inputs, beta=beta, loss_type=loss_type)
    theirs = official(*inputs, beta, loss_type)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_log2_when_policy_is_reference():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    gen = torch.tensor([-7.0, -9.0, -1.0])
    losses, real_r, gen_r = spin_loss(logps, gen, logps, gen, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert real_r.abs().max() == 0 and gen_r.abs().max() == 0


def test_unknown_loss_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(x, x, x, x, beta=0.1, loss_type="kto")


def test_sequence_logps_masks_prompt_and_padding():
    prompts = [[5, 6, 7], [5]]
    responses = [[8, 9], [10, 11, 12, 13, 14]]
    batch = pad_pairs(prompts, responses, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [5, 10, 11, 12, 13, 14]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 20, generator=g)
    got = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    logp = logits.log_softmax(-1)
    # Token at position i is predicted by logits at i-1; only response tokens count.
    want = [
        logp[0, 2, 8] + logp[0, 3, 9],
        logp[1, 0, 10] + logp[1, 1, 11] + logp[1, 2, 12] + logp[1, 3, 13] + logp[1, 4, 14],
    ]
    torch.testing.assert_close(got, torch.stack(want))
    # Changing logits at padding or prompt-only positions changes nothing.
    logits2 = logits.clone()
    logits2[0, 4:] += 100.0  # position 4 predicts the pad token
    logits2[0, 0:2] -= 100.0
    torch.testing.assert_close(sequence_logps(logits2, batch["input_ids"], batch["response_mask"]), got)


def test_distinct_pair_metrics_count_identical_pairs_as_neither_right_nor_wrong():
    """Two batches of 4: an identical pair (y' = y) has margin 0 and is left out of the distinct
    figures, which are then means over the 5 distinct pairs of both batches."""
    from spin_ray.loss import spin_metrics
    from spin_ray.stages import distinct_only

    def batch(real, generated, identical):
        real, generated = torch.tensor(real), torch.tensor(generated)
        losses, real_r, gen_r = spin_loss(real, generated, torch.zeros(4), torch.zeros(4), beta=1.0)
        lengths = (torch.tensor([3, 3, 5, 2]), torch.tensor([3, 4, 5, 6]))
        return spin_metrics(losses, real_r, gen_r, real, generated, torch.tensor(identical), lengths)

    first = batch([1.0, -1.0, 2.0, 0.0], [0.0, 0.0, 2.0, 0.0], [False, False, True, True])
    second = batch([3.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [False, True, False, False])
    assert first["rewards/accuracies"] == 0.25 and first["pairs/identical"] == 0.5
    assert first["lengths/real"] == 3.25 and first["lengths/generated"] == 4.5
    both = distinct_only([first, second])
    # distinct margins: 1, -1 | 2, 1, -1; right: 1 of 2 | 2 of 3
    assert both == {"rewards/margins_distinct": 2 / 5, "rewards/accuracies_distinct": 3 / 5}
    assert distinct_only([batch([0.0] * 4, [0.0] * 4, [True] * 4)])["rewards/accuracies_distinct"] != 0.0  # NaN
    assert distinct_only([{"loss": 1.0}]) == {}  # the SFT arm


def test_iteration_means_weigh_each_logged_line_by_its_pairs():
    """An iteration's 48 pairs logged as a line of 32 and one of 16: means over the pairs, not the lines."""
    from spin_ray.stages import Trained, distinct_only

    lines = [
        {"loss": 1.0, "pairs/identical": 0.5, "rewards/accuracies_distinct": 0.25, "pairs": 32.0},  # 8 of 16 right
        {"loss": 4.0, "pairs/identical": 0.0, "rewards/accuracies_distinct": 1.0, "pairs": 16.0},  # 16 of 16 right
    ]
    metrics = Trained(lines, seconds=1.0, steps=2, pid=0).metrics()
    assert metrics["train/loss"] == 2.0 and metrics["train/pairs/identical"] == 1 / 3
    assert metrics["train/rewards/accuracies_distinct"] == distinct_only(lines)["rewards/accuracies_distinct"] == 0.75
