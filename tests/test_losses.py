import math

import pytest
import torch

from mpsclip.losses import (
    LossConfig,
    contrastive_loss,
    max_view_scores,
    mpsclip_loss,
    multi_view_contrastive_loss,
    weighted_triplet_loss,
)


def test_weighted_triplet_hand_value():
    scores = torch.tensor([[0.5, 0.4], [0.1, 0.6]])
    # only text cost (0, 1) = 0.2 + 0.4 - 0.5 = 0.1 is positive
    expected = 0.5 * (1 - math.exp(-0.1)) ** 2 * 0.1
    assert weighted_triplet_loss(scores).item() == pytest.approx(expected, rel=1e-5)


def test_weighted_triplet_sums_both_directions():
    scores = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    c = 0.5
    per = (1 - math.exp(-c)) ** 2 * c
    assert weighted_triplet_loss(scores).item() == pytest.approx(0.5 * 4 * per, rel=1e-5)


def test_contrastive_diagonal_hand_value():
    eye = torch.eye(2)
    assert contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_contrastive_soft_targets_hand_value():
    eye = torch.eye(2)
    loss = contrastive_loss(eye, eye, 1.0, ids=torch.tensor([7, 7]))
    assert loss.item() == pytest.approx(math.log(math.e + 1) - 0.5, rel=1e-6)


def test_max_view_scores_takes_elementwise_max():
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two views
    text = torch.tensor([[0.2, 0.9], [0.8, 0.1]])
    assert torch.allclose(max_view_scores(views, text), torch.tensor([[0.9, 0.8]]))


def test_multi_view_contrastive_hand_values():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    text = torch.stack([e1, e2])
    # each image's best view matches its own caption (the opposite views never win the max): logits = I
    apart = torch.stack([torch.stack([e1, -e1]), torch.stack([e2, -e2])])
    assert multi_view_contrastive_loss(apart, text, torch.tensor(1.0)).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6
    )
    # image 0 also has a view on caption 1: logits [[1, 1], [0, 1]]; each direction has one row of log 2 and one
    # of log(1 + e) - 1, so the loss rises to their mean
    confused = torch.stack([torch.stack([e1, e2]), torch.stack([e2, -e2])])
    expected = (math.log(2) + math.log(1 + math.e) - 1) / 2
    assert multi_view_contrastive_loss(confused, text, torch.tensor(1.0)).item() == pytest.approx(expected, rel=1e-6)


def test_total_is_weighted_sum():
    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    views = torch.nn.functional.normalize(torch.randn(4, 4, 8), dim=-1)
    cfg = LossConfig()
    out = mpsclip_loss(img, txt, views, torch.tensor(100.0), cfg)
    base = contrastive_loss(img, txt, 0.07) + weighted_triplet_loss(img @ txt.t())
    mv = 0.2 * multi_view_contrastive_loss(views, txt, torch.tensor(100.0)) + 0.2 * weighted_triplet_loss(
        max_view_scores(views, txt)
    )
    assert out["total"].item() == pytest.approx((base + mv).item(), rel=1e-6)
    assert out["total"].item() == pytest.approx((out["contrastive"] + out["triplet"]).item(), rel=1e-6)
    no_views = mpsclip_loss(img, txt, None, torch.tensor(100.0), cfg)
    assert no_views["total"].item() == pytest.approx(base.item(), rel=1e-6)
