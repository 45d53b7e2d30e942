"""Hand-derivable answers for the NFT objective, group weights, best-of-N, prefix sampling,
EMA schedules and the optimiser split (issue 4, point 7)."""
from __future__ import annotations

import pytest
import torch

from persistworld.objectives.nft import NFTVariant, kl_to_base, nft_loss
from persistworld.rewards.group import best_of_n, group_advantages, shuffle_within_groups
from persistworld.rollout.prefix import PrefixSampler
from persistworld.trainers.ema import EMASchedule, ema_update
from persistworld.trainers.optim import build_optimizer, warmup_cosine


def _grad_at_old(r: float, beta: float = 0.3):
    g = torch.Generator().manual_seed(0)
    x0_old = torch.randn(1, 2, 3, 4, generator=g)
    x0 = torch.randn(1, 2, 3, 4, generator=g)
    theta = x0_old.clone().requires_grad_(True)
    nft_loss(theta, x0_old, x0, torch.tensor([r]), beta)["loss"].sum().backward()
    return theta.grad, x0_old, x0


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 1.0])
def test_gradient_at_old_policy_is_2r_minus_1_times_old_minus_candidate(r):
    beta = 0.3
    grad, x0_old, x0 = _grad_at_old(r, beta)
    expected = 2 * beta * (2 * r - 1) * (x0_old - x0) / x0.numel()
    torch.testing.assert_close(grad, expected)


def test_gradient_direction_toward_good_and_away_from_bad_candidates():
    g1, x0_old, x0 = _grad_at_old(1.0)
    g0, _, _ = _grad_at_old(0.0)
    gh, _, _ = _grad_at_old(0.5)
    toward = (x0 - x0_old).flatten()
    assert torch.dot(-g1.flatten(), toward) > 0   # descent moves toward the candidate at r=1
    assert torch.dot(-g0.flatten(), toward) < 0   # and away from it at r=0
    assert gh.abs().max() < 1e-7                  # no push at r=1/2 (float rounding only)


def test_beta_to_zero_recovers_denoising_against_old_policy():
    g = torch.Generator().manual_seed(1)
    x0_old, x0, theta = (torch.randn(3, 8, generator=g) for _ in range(3))
    out = nft_loss(theta, x0_old, x0, torch.tensor([0.1, 0.5, 0.9]), beta=1e-8)
    torch.testing.assert_close(out["loss"], (x0_old - x0).pow(2).mean(1))


def test_variants_scale_as_documented():
    g = torch.Generator().manual_seed(2)
    x0_old, x0, theta = (torch.randn(2, 5, generator=g) for _ in range(3))
    r = torch.tensor([0.2, 0.8])
    base = nft_loss(theta, x0_old, x0, r, 0.5)["loss"]
    scaled = nft_loss(theta, x0_old, x0, r, 0.5, NFTVariant(inv_beta_scale=True,
                                                            adv_clip_scale=5.0))["loss"]
    torch.testing.assert_close(scaled, base / 0.5 * 5.0)
    adaptive = nft_loss(theta, x0_old, x0, r, 0.5, NFTVariant(adaptive_weighting=True))
    x0_pos = 0.5 * x0_old + 0.5 * theta
    torch.testing.assert_close(adaptive["pos"], (x0_pos - x0).pow(2).mean(1)
                               / (x0_pos - x0).abs().mean(1))
    with pytest.raises(ValueError, match="beta"):
        nft_loss(theta, x0_old, x0, r, 0.0)


def test_kl_to_base_is_zero_at_base_and_per_sample():
    x = torch.randn(4, 3, 2)
    assert kl_to_base(x, x).shape == (4,) and kl_to_base(x, x).abs().max() == 0
    torch.testing.assert_close(kl_to_base(x + 2.0, x), torch.full((4,), 4.0))


def test_group_weights_invariant_to_shift_and_scale():
    R = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [3.0, 1.0, 2.0, 2.5, 0.0]])
    A, r = group_advantages(R)
    A2, r2 = group_advantages(R * 7.5 - 3.0)
    torch.testing.assert_close(r, r2)
    torch.testing.assert_close(A, A2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    assert r.min() >= 0 and r.max() <= 1
    # hand case: K=2 -> A = +-1 exactly (population std) -> r = 1 and 0
    _, r_two = group_advantages(torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(r_two, torch.tensor([[0.0, 1.0]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


def test_batch_normalised_weights_follow_the_size_of_each_groups_gaps():
    """norm="batch": one std for the step, so a group of near-equal candidates weighs ~1/2
    where per-group std gives it the full 0 / 1; still invariant to one shift and scale of
    the whole batch and to a shift of one group."""
    R = torch.tensor([[0.50, 0.51, 0.49, 0.50], [0.0, 1.0, 0.5, 0.2]])
    A_g, r_g = group_advantages(R)
    A_b, r_b = group_advantages(R, norm="batch")
    assert (r_g[0].max() - r_g[0].min()) > 0.9                 # per group: a coin toss
    assert (r_b[0] - 0.5).abs().max() < 0.05                    # per batch: barely weighted
    assert (r_b[1].max() - r_b[1].min()) > 0.9                  # a real gap still counts
    centred = R - R.mean(1, keepdim=True)
    torch.testing.assert_close(A_b, centred / centred.pow(2).mean().sqrt(), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(group_advantages(R * 3.0 + 1.0, norm="batch")[1], r_b)
    shifted = R + torch.tensor([[5.0], [0.0]])
    torch.testing.assert_close(group_advantages(shifted, norm="batch")[1], r_b, atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match="norm"):
        group_advantages(R, norm="global")


def test_shuffled_rewards_are_each_groups_own_in_another_order():
    R = torch.arange(40, dtype=torch.float32).view(5, 8)
    S = shuffle_within_groups(R, torch.Generator().manual_seed(0))
    assert torch.equal(S.sort(1).values, R)                       # each row keeps its rewards
    assert not torch.equal(S, R)
    assert len({tuple(row.argsort().tolist()) for row in S}) > 1   # rows get their own orders
    assert torch.equal(S, shuffle_within_groups(R, torch.Generator().manual_seed(0)))


def test_best_of_n_picks_exactly_top_and_bottom():
    R = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0]])
    idx = best_of_n(R, 2)
    assert idx.tolist() == [[2, 6, 5, 1]]  # top-2 (9, 8) then bottom-2 (0, 1)
    assert best_of_n(R, None).shape == (1, 8)
    assert sorted(best_of_n(R, 4)[0].tolist()) == list(range(8))


def test_prefix_strategies_follow_their_distributions():
    g = torch.Generator().manual_seed(0)
    uni = PrefixSampler("uniform", 0, 9).sample(0, 20000, g)
    counts = torch.bincount(uni, minlength=10).float()
    assert uni.min() == 0 and uni.max() == 9
    assert (counts / 20000 - 0.1).abs().max() < 0.015
    assert PrefixSampler("fixed", 3).sample(5, 100, g).eq(3).all()
    cur = PrefixSampler("curriculum", 0, 8, ramp_steps=100)
    assert cur.sample(0, 500, g).eq(0).all()
    assert cur.sample(50, 5000, g).max() == 4
    late = cur.sample(1000, 5000, g)
    assert late.min() == 0 and late.max() == 8
    with pytest.raises(ValueError, match="rollout.prefix.strategy"):
        PrefixSampler("random")


def test_old_policy_schedules():
    assert EMASchedule("paper").decay(0) == 0.0
    assert EMASchedule("paper").decay(250) == pytest.approx(0.25)
    assert EMASchedule("paper").decay(500) == EMASchedule("paper").decay(8000) == 0.5
    assert EMASchedule("linear", max=0.5, a=0.001).decay(100) == pytest.approx(0.1)
    assert EMASchedule("affine", max=0.9, start=0.2, a=0.01).decay(10) == pytest.approx(0.3)
    assert EMASchedule("affine", max=0.9, start=0.2, a=0.01).decay(1000) == 0.9
    assert EMASchedule("none").decay(10) == 1.0 and EMASchedule("copy").decay(10) == 0.0
    with pytest.raises(ValueError, match="old_policy.schedule"):
        EMASchedule("cosine")
    t, s = [torch.zeros(3)], [torch.ones(3)]
    ema_update(t, s, 0.75)
    torch.testing.assert_close(t[0], torch.full((3,), 0.25))


def test_muon_takes_matrices_and_adamw_the_rest():
    lin = torch.nn.Linear(4, 3)
    opt = build_optimizer(lin.parameters(), "muon", lr=1e-2)
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds == ["Muon", "AdamW"]
    lin(torch.randn(5, 4)).pow(2).sum().backward()
    before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, lin.weight)
    opt.set_lr_factor(0.5)
    assert all(g["lr"] == g["base_lr"] * 0.5 for g in opt.param_groups)
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(lin.parameters(), "sgd")


def test_muon_leaves_embeddings_to_adamw():
    from persistworld.world_model.embedded import ActionEncoder
    enc = ActionEncoder(7, 8, 11)
    opt = build_optimizer(list(enc.named_parameters()), "muon", lr=1e-2)
    muon, adamw = opt.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(enc.frame_embedding) in in_adamw and id(enc.frame_embedding) not in in_muon
    assert {id(enc.mlp[0].weight), id(enc.mlp[2].weight)} <= in_muon


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, final=0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, 0, 100) == 1.0


def test_history_noise_level_is_per_sample():
    from persistworld.objectives.denoising import noised_history
    from persistworld.world_model.interface import HistoryBuffer
    buf = HistoryBuffer(torch.zeros(3, 2, 1, 2, 2), torch.zeros(3, 2, 7))
    eps = torch.ones(3, 2, 1, 2, 2)
    out = noised_history(buf, 0.3, eps, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(out.latents[:, 0, 0, 0, 0], torch.tensor([0.0, 0.3, 0.6]))
    assert noised_history(buf, 0.0, eps, torch.ones(3)) is buf          # 0 = off
    assert torch.allclose(noised_history(buf, 0.3, eps).latents, 0.3 * eps)   # fixed level


def test_every_loss_takes_the_estimate_and_the_samples():
    """The shared signature term(x0_theta, Samples): NFT, RWR, KL and the denoising loss read
    only what they declare in ``needs`` and give the functional forms' values."""
    from persistworld.objectives.nft import rwr_loss
    from persistworld.objectives.terms import NFT, RWR, Denoising, KLToBase, Samples
    from persistworld.world_model import edm
    g = torch.Generator().manual_seed(3)
    theta, x0, old, base = (torch.randn(3, 2, 4, generator=g) for _ in range(4))
    r, sigma = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.1, 1.0, 5.0])
    full = Samples(x0, sigma, r=r, x0_old=old, x0_base=base)
    torch.testing.assert_close(NFT(0.3)(theta, full)["loss"], nft_loss(theta, old, x0, r, 0.3)["loss"])
    torch.testing.assert_close(RWR()(theta, full)["loss"], r * (theta - x0).pow(2).mean((1, 2)))
    torch.testing.assert_close(KLToBase()(theta, full)["loss"], kl_to_base(theta, base))
    mse = (theta - x0).pow(2).mean((1, 2))
    torch.testing.assert_close(Denoising()(theta, full)["loss"], edm.loss_weight(sigma) * mse)
    w = torch.zeros(3, 2, 4)
    w[:, 0] = 1.0                                             # only the first frame counts
    weighted = Denoising()(theta, Samples(x0, sigma, weight=w))["loss"]
    torch.testing.assert_close(weighted, edm.loss_weight(sigma) * (theta - x0)[:, 0].pow(2).mean(1))
    for term in (NFT(0.3), RWR(), KLToBase(), Denoising()):
        term(theta, Samples(x0, sigma, **{k: getattr(full, k) for k in term.needs}))
        for k in term.needs:                                  # each declared need is read
            with pytest.raises(ValueError, match=k):
                term(theta, Samples(x0, sigma, **{n: getattr(full, n) for n in term.needs
                                                  if n != k}))
    # RWR: no push at r = 0, toward the candidate at r = 1 (descent direction)
    t = theta.clone().requires_grad_(True)
    rwr_loss(t, x0, r)["loss"].sum().backward()
    assert t.grad[0].abs().max() == 0
    assert torch.dot(-t.grad[2].flatten(), (x0 - theta)[2].flatten()) > 0


def test_post_training_term_is_chosen_and_checked():
    from omegaconf import OmegaConf
    from persistworld.errors import UserError
    from persistworld.objectives.terms import NFT, RWR, post_training_term
    o = OmegaConf.create({"name": "nft", "beta": 0.5, "inv_beta_scale": True,
                          "adaptive_weighting": False, "adv_clip_scale": False})
    assert post_training_term(o, NFTVariant(inv_beta_scale=True)) == \
        NFT(0.5, NFTVariant(inv_beta_scale=True))
    with pytest.raises(UserError, match="objective.inv_beta_scale"):
        post_training_term(OmegaConf.merge(o, {"name": "rwr"}), NFTVariant())
    assert isinstance(post_training_term(OmegaConf.merge(o, {"name": "rwr", "inv_beta_scale":
                                                             False}), NFTVariant()), RWR)
    with pytest.raises(UserError, match="objective.name"):
        post_training_term(OmegaConf.merge(o, {"name": "grpo"}), NFTVariant())
