import math

import pytest
import torch

from prefvec_ds.train.losses import LOSSES, SafetyLabels, preference_loss


def test_sigmoid_matches_hand_computed_value():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    loss, m = preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]),
                              torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2)
    assert m["rewards/accuracies"].item() == 1.0


def test_label_smoothing_mixes_both_sides():
    h = torch.tensor([2.0])
    loss, _ = preference_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5,
                              label_smoothing=0.25)
    expected = 0.75 * math.log(1 + math.exp(-1.0)) + 0.25 * math.log(1 + math.exp(1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ipo_and_hinge_values():
    z = torch.zeros(2)
    h = torch.tensor([1.0, 10.0])
    ipo, _ = preference_loss(h, z, z, z, beta=0.25, loss_type="ipo")
    assert ipo.item() == pytest.approx(((1 - 2) ** 2 + (10 - 2) ** 2) / 2)
    hinge, _ = preference_loss(h, z, z, z, beta=0.5, loss_type="hinge")
    assert hinge.item() == pytest.approx((0.5 + 0.0) / 2)
    assert LOSSES["ipo"].average_logps and not LOSSES["sigmoid"].average_logps


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    loss, _ = preference_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, "kto")


@pytest.mark.parametrize("chosen_safe,rejected_safe,target", [
    (1, 0, 10.0), (1, 1, 5.0), (0, 0, -5.0), (0, 1, -10.0)])
def test_bfpo_regresses_to_the_safety_target(chosen_safe, rejected_safe, target):
    """BFPO with b1 = 3 (b3 = 0.5), alpha = 0.5, beta = 0.1: target (1.5 s_c - 0.5 s_r - 0.5)/0.1,
    hand-computed per label case; loss = (h - target)^2."""
    h = torch.tensor([2.0])
    z = torch.zeros(1)
    safety = SafetyLabels(torch.tensor([float(chosen_safe)]), torch.tensor([float(rejected_safe)]),
                          b1=3.0, alpha=0.5)
    loss, _ = preference_loss(h, z, z, z, beta=0.1, loss_type="bfpo", safety=safety)
    assert loss.item() == pytest.approx((2.0 - target) ** 2, rel=1e-6)
    at_target, _ = preference_loss(torch.tensor([target]), z, z, z, beta=0.1, loss_type="bfpo",
                                   safety=safety)
    assert at_target.item() == pytest.approx(0.0, abs=1e-9)


def test_bfpo_options_and_missing_labels():
    h, z = torch.tensor([0.0]), torch.zeros(1)
    safety = SafetyLabels(torch.ones(1), torch.zeros(1), b1=5.0, alpha=0.0)
    # b3 = 1/4: target = (5 * 0.25 * 1 - 0) / 0.5 = 2.5
    loss, _ = preference_loss(h, z, z, z, beta=0.5, loss_type="bfpo", safety=safety)
    assert loss.item() == pytest.approx(2.5 ** 2)
    assert LOSSES["bfpo"].needs_safety and not LOSSES["sigmoid"].needs_safety
    with pytest.raises(ValueError, match="needs the pairs' safety labels"):
        preference_loss(h, z, z, z, beta=0.1, loss_type="bfpo")
    from prefvec_ds.config.schema import DPOConfig

    assert (DPOConfig().bfpo_b1, DPOConfig().bfpo_alpha) == (3.0, 0.5)  # the authors' defaults
