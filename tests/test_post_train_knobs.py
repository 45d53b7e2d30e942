"""Post-training's memory layout (one frozen backbone with named adapters) and the knobs the
ablation tables turn: each test here fails if its knob stops doing what the table assumes."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from test_post_train import _compose, _post_overrides, _rows, _weights, base_model  # noqa: F401

SHORT = ["trainer.steps=3", "trainer.eval_every=0", "eval.enabled=false", "trainer.ckpt_every=3"]


def _trainer(tiny_dataset, base_model, run_dir, extra=()):  # noqa: F811
    from persistworld.trainers.post_train import PostTrainer
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, [*SHORT, *extra])
    return PostTrainer(_compose("post_train", overrides), overrides=overrides)


def _run(tiny_dataset, base_model, run_dir, extra=()):  # noqa: F811
    from persistworld.trainers.post_train import post_train
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, [*SHORT, *extra])
    post_train(_compose("post_train", overrides), overrides=overrides)
    return run_dir


def _record_update_calls(monkeypatch):
    """Spy on S4: (the candidates each update received, the adapter role active at each
    ``denoise`` call inside the update)."""
    import persistworld.trainers.post_train as pt
    captured, calls = [], []
    real_update = pt.PostTrainer.stage_update

    def update(self, cands, keep, r, at):
        captured.append(cands)
        inner = self.model.denoise

        def count(*a, **k):
            calls.append(self.roles.active)
            return inner(*a, **k)
        self.model.denoise = count
        try:
            return real_update(self, cands, keep, r, at)
        finally:
            del self.model.denoise

    monkeypatch.setattr(pt.PostTrainer, "stage_update", update)
    return captured, calls


def _assert_same_weights(a_dir, b_dir, rtol, atol):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def _last_ckpt(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)


# ---- one backbone -------------------------------------------------------------------------
def test_the_trainer_holds_one_copy_of_every_frozen_tensor(tiny_dataset, base_model,  # noqa: F811
                                                            tmp_path):
    """With the policy, the old policy and the policy EMA all live, every frozen backbone
    tensor exists in exactly one storage among everything the trainer holds, and the three
    roles have their own LoRA factors."""
    from persistworld.trainers.adapters import BASE, ENCODER
    from persistworld.utils.census import held_tensors, storage_key
    tr = _trainer(tiny_dataset, base_model, tmp_path / "run", ["policy_ema.decay=0.9"])
    assert tr.roles.roles == ("policy", "old", "ema")
    with tr.roles.use(BASE) as m:
        frozen = {n: p for n, p in m.named_parameters()
                  if ".lora_" not in n and not n.startswith(ENCODER + ".")}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    mine = {storage_key(p) for p in frozen.values()}
    others = [t for t in held_tensors(tr) if storage_key(t) not in mine]
    for n, p in frozen.items():
        copies = [t for t in others if t.shape == p.shape and torch.equal(t, p)]
        assert not copies, f"{n} is held {1 + len(copies)} times"
    # the count of backbone storages is that of the base model itself
    from persistworld.world_model import load_world_model
    assert len(mine) == sum(1 for n, _ in load_world_model(base_model).named_parameters()
                            if not n.startswith(ENCODER + "."))
    # each role has its own adapter tensors (copies of the policy's at the start)
    ids = [{storage_key(p) for p in tr.roles.params(r)} for r in tr.roles.roles]
    assert all(a.isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1:])
    for role in ("old", "ema"):
        for a, b in zip(tr.roles.params("policy"), tr.roles.params(role), strict=True):
            assert torch.equal(a, b)
    assert all(p.requires_grad for p in tr.roles.params("policy"))
    assert not any(p.requires_grad for r in ("old", "ema") for p in tr.roles.params(r))


class SeparateCopies:
    """The layout before named adapters, kept as the oracle: base, policy, old policy and EMA
    as four deep copies of the model, one LoRA adapter each."""

    def __init__(self, model, roles, rank, alpha, target_modules, train_action_encoder=True):
        from peft import LoraConfig, inject_adapter_in_model
        model.requires_grad_(False)
        policy = copy.deepcopy(model)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=list(target_modules)),
                                policy.adapter_root())
        for n, p in policy.named_parameters():
            p.requires_grad_("lora_" in n or (train_action_encoder
                                              and n.startswith("action_encoder.")))
        self.roles = tuple(roles)
        self.models = {"base": model, "policy": policy,
                       **{r: copy.deepcopy(policy).requires_grad_(False) for r in roles[1:]}}
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def use(self, role):
        yield self.models[role]

    def params(self, role):
        named = dict(self.models[role].named_parameters())
        return [named[n] for n in self.names]

    def named_trainable(self):
        return list(zip(self.names, self.params("policy")))

    def state(self, role):
        return {n: p.detach().clone() for n, p in zip(self.names, self.params(role))}

    def load_state(self, role, state, source=""):
        for n, p in zip(self.names, self.params(role)):
            p.data.copy_(state[n])

    def copy_(self, source, target):
        for t, s in zip(self.params(target), self.params(source)):
            t.data.copy_(s)

    def frozen_checksums(self):
        return {}

    def merged_state_dict(self, role):
        from peft.tuners.lora import LoraLayer
        merged = copy.deepcopy(self.models[role])
        for m in merged.modules():
            if isinstance(m, LoraLayer):
                m.merge()
        return {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items()
                if "lora_" not in k}


@pytest.mark.parametrize("extra", [
    ["old_policy.schedule=frozen", "policy_ema.decay=0.5", "objective.w_kl=0.01"],
    ["old_policy.schedule=copy", "policy_ema.decay=0.5"],
    ["old_policy.schedule=affine", "policy_ema.decay=0.5", "rollout.sampling_policy=old"],
], ids=["frozen", "copy", "affine-sample-old"])
def test_named_adapters_equal_separate_copies(tiny_dataset, base_model, tmp_path,  # noqa: F811
                                              monkeypatch, extra):
    """The shared-backbone trainer ends with the same weights, checkpoint and losses as the
    four-copies layout it replaced, for the old-policy schedules (d = 1, 0, in between), with
    the policy EMA on, the KL term on, and rollouts sampled by the old policy."""
    import persistworld.trainers.post_train as pt
    shared = _run(tiny_dataset, base_model, tmp_path / "shared", extra)
    monkeypatch.setattr(pt, "NamedAdapters", SeparateCopies)
    copies = _run(tiny_dataset, base_model, tmp_path / "copies", extra)
    _assert_same_weights(shared, copies, rtol=0, atol=1e-6)
    ca, cb = _last_ckpt(shared), _last_ckpt(copies)
    for role in ("policy", "old", "ema"):
        assert ca[role].keys() == cb[role].keys()
        for k in ca[role]:
            torch.testing.assert_close(ca[role][k], cb[role][k], rtol=0, atol=1e-6)
    assert [r["loss"] for r in _rows(shared, "train")] == pytest.approx(
        [r["loss"] for r in _rows(copies, "train")], abs=1e-7)
    assert any(not torch.equal(ca["policy"][k], ca["ema"][k]) for k in ca["policy"])


# ---- the knobs ----------------------------------------------------------------------------
def test_micro_batches_change_memory_not_the_result(tiny_dataset, base_model,  # noqa: F811
                                                     tmp_path):
    """trainer.micro_batch=1 (one candidate per backward pass) accumulates to the same step
    as all candidates at once: the same noise per sample, the same summed gradients."""
    whole = _run(tiny_dataset, base_model, tmp_path / "whole", ["optim.grad_clip=0"])
    micro = _run(tiny_dataset, base_model, tmp_path / "micro",
                 ["optim.grad_clip=0", "trainer.micro_batch=1"])
    _assert_same_weights(whole, micro, rtol=1e-4, atol=1e-6)
    la, lb = _rows(whole, "train"), _rows(micro, "train")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-4)


def test_sigma_source_sampler_grid_uses_the_samplers_levels(tiny_dataset,  # noqa: F811
                                                             base_model, tmp_path):
    """objective.sigma=sampler_grid draws the update's noise levels from the rollout
    sampler's own grid; lognormal draws from the training distribution (off the grid)."""
    grid_tr = _trainer(tiny_dataset, base_model, tmp_path / "g",
                       ["objective.sigma=sampler_grid"])
    grid = grid_tr.model.sampler_sigmas(grid_tr.cfg.rollout.sampler_steps)[:-1]
    drawn = grid_tr.sample_sigma(200, torch.Generator().manual_seed(0))
    assert torch.isin(drawn, grid).all()
    assert len(torch.unique(drawn)) == len(grid) == int(grid_tr.cfg.rollout.sampler_steps)
    logn = _trainer(tiny_dataset, base_model, tmp_path / "l").sample_sigma(
        200, torch.Generator().manual_seed(0))
    assert not torch.isin(logn, grid).any() and len(torch.unique(logn)) == 200


def test_sampling_policy_old_samples_with_the_old_adapter(tiny_dataset, base_model,  # noqa: F811
                                                          tmp_path, monkeypatch):
    """rollout.sampling_policy=old: every prefix and branch chunk is sampled with the old
    policy's adapter active (current: the policy's); the update still trains the policy."""
    from persistworld.world_model.embedded import EmbeddedWorldModel
    import persistworld.trainers.post_train as pt
    seen, trainers = [], []
    inner = EmbeddedWorldModel.sample_chunk

    def spy(self, *a, **k):
        seen.append(trainers[0].roles.active)
        return inner(self, *a, **k)

    real = pt.PostTrainer.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        trainers.append(self)

    monkeypatch.setattr(EmbeddedWorldModel, "sample_chunk", spy)
    monkeypatch.setattr(pt.PostTrainer, "__init__", init)
    for policy in ("old", "current"):
        seen.clear(), trainers.clear()
        run = _run(tiny_dataset, base_model, tmp_path / policy,
                   [f"rollout.sampling_policy={policy}", "trainer.steps=1"])
        assert seen and set(seen) == {"old" if policy == "old" else "policy"}, policy
        assert _rows(run, "train")[0]["loss"] != 0


def test_policy_ema_is_what_gets_exported_and_does_not_steer_training(  # noqa: F811
        tiny_dataset, base_model, tmp_path):
    """policy_ema.decay > 0 (Table 11): the policy trains exactly as without it, the EMA is
    p_ema <- d p_ema + (1 - d) p, and model.pt is the EMA's merged weights, not the policy's."""
    plain = _run(tiny_dataset, base_model, tmp_path / "plain", ["trainer.ckpt_every=1"])
    ema = _run(tiny_dataset, base_model, tmp_path / "ema",
               ["policy_ema.decay=0.5", "trainer.ckpt_every=1"])
    cp, ce = _last_ckpt(plain), _last_ckpt(ema)
    for k in cp["policy"]:
        torch.testing.assert_close(cp["policy"][k], ce["policy"][k], rtol=0, atol=0)
    prev, last = [torch.load(p, weights_only=False)
                  for p in sorted((ema / "checkpoints").glob("*.pt"))]
    assert (prev["step"], last["step"]) == (2, 3)
    for k in last["ema"]:
        torch.testing.assert_close(last["ema"][k], 0.5 * prev["ema"][k] + 0.5 * last["policy"][k],
                                   rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(last["ema"][k], last["policy"][k]) for k in last["ema"])
    pe, pp = _weights(ema), _weights(plain)
    assert any(not torch.equal(pe[n], pp[n]) for n in pe)


def test_branch_chunks_f2_update_both_chunks(tiny_dataset, base_model, tmp_path,  # noqa: F811
                                             monkeypatch):
    """rollout.branch_chunks=2 (Table 7): each candidate is two chunks, the second
    conditioned on the first (its history ends with the first chunk's frames), and the update
    trains on both (two policy forward passes per step)."""
    captured, calls = _record_update_calls(monkeypatch)
    _run(tiny_dataset, base_model, tmp_path / "f2",
         ["rollout.branch_chunks=2", "trainer.steps=1", "objective.w_kl=0"])
    cands = captured[0]
    assert len(cands.latents) == 2
    L = cands.latents[0].shape[1]
    torch.testing.assert_close(cands.buffers[1].latents[:, -L:], cands.latents[0])
    assert calls.count("policy") == 2 and calls.count("old") == 2


def test_muon_in_the_trainer(tiny_dataset, base_model, tmp_path):  # noqa: F811
    """optim.name=muon: LoRA matrices go to Muon, the action encoder's frame embedding and the
    biases to AdamW, and the run's weights differ from an AdamW run's."""
    from torch.optim import AdamW
    tr = _trainer(tiny_dataset, base_model, tmp_path / "t", ["optim.name=muon"])
    names = {id(p): n for n, p in tr.roles.named_trainable()}
    groups = {type(o).__name__: [names[id(p)] for g in o.param_groups for p in g["params"]]
              for o in tr.opt.optimizers}
    muon = next(v for k, v in groups.items() if k != AdamW.__name__)
    adamw = groups[AdamW.__name__]
    assert muon and all(".lora_" in n or n.endswith("weight") for n in muon)
    assert "action_encoder.frame_embedding" in adamw
    assert all(not n.endswith("bias") for n in muon)
    a = _run(tiny_dataset, base_model, tmp_path / "muon", ["optim.name=muon"])
    b = _run(tiny_dataset, base_model, tmp_path / "adamw", ["optim.name=adamw"])
    wa, wb = _weights(a), _weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_checkpointing_changes_memory_not_the_weights(tiny_dataset,  # noqa: F811
                                                               base_model, tmp_path):
    """trainer.gradient_checkpointing=true recomputes the UNet's activations in backward (it
    is really on) and ends with the same weights; the fingerprint ignores it."""
    tr = _trainer(tiny_dataset, base_model, tmp_path / "t", ["trainer.gradient_checkpointing=true"])
    assert tr.model.adapter_root().is_gradient_checkpointing
    plain = _run(tiny_dataset, base_model, tmp_path / "plain", ["trainer.steps=2"])
    ckpt = _run(tiny_dataset, base_model, tmp_path / "ckpt",
                ["trainer.steps=2", "trainer.gradient_checkpointing=true"])
    _assert_same_weights(plain, ckpt, rtol=1e-5, atol=1e-6)
    import json
    fp = [json.loads((d / "fingerprint.json").read_text())["fingerprint"] for d in (plain, ckpt)]
    assert fp[0] == fp[1]


def test_objective_rwr_drops_the_old_policy_and_is_its_own_run(tiny_dataset,  # noqa: F811
                                                               base_model, tmp_path,
                                                               monkeypatch):
    """objective.name=rwr swaps S4's term through the shared signature: the update calls the
    policy and the base model (KL) but never the old policy, logs the RWR parts, ends with other
    weights than NFT, and is fingerprinted as another run; NFT-only switches are refused with
    it before any work."""
    from persistworld.errors import UserError
    _, calls = _record_update_calls(monkeypatch)
    rwr = _run(tiny_dataset, base_model, tmp_path / "rwr", ["objective.name=rwr"])
    assert "old" not in calls and calls.count("policy") == calls.count("base") == 3
    row = _rows(rwr, "train")[0]
    assert {"loss", "loss/pos", "loss/kl"} <= row.keys()
    assert "loss/neg" not in row and "old_deviation" not in row
    calls.clear()
    nft = _run(tiny_dataset, base_model, tmp_path / "nft", [])
    assert calls.count("old") == 3
    wa, wb = _weights(rwr), _weights(nft)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    from persistworld.utils import fingerprint
    a, b = (fingerprint.read_identity(d) for d in (rwr, nft))
    assert fingerprint.differences(b, a) == ["objective.name"]
    # at "nft" the new key is left out, so runs recorded before it keep their fingerprint
    assert "name" not in b["settings"]["objective"] and a["settings"]["objective"]["name"] == "rwr"
    with pytest.raises(UserError, match="objective.adaptive_weighting"):
        _trainer(tiny_dataset, base_model, tmp_path / "bad",
                 ["objective.name=rwr", "objective.adaptive_weighting=true"])
    with pytest.raises(UserError, match="objective.name"):
        _trainer(tiny_dataset, base_model, tmp_path / "bad2", ["objective.name=ppo"])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_ramps_advance_by_samples_seen_in_steps_of_schedule_batch(tiny_dataset,  # noqa: F811
                                                                 base_model, tmp_path):
    """trainer.schedule_batch: the old-policy ramp and the learning-rate warm-up advance by
    samples seen / schedule_batch, so a run at batch 2 written for batch 4 reaches, after 4
    samples, the decay and learning rate that a batch-4 run has after 4 samples (its step 1);
    null keeps the ramps in steps (and older fingerprints); a bad value fails before any work."""
    from persistworld.errors import UserError
    from persistworld.utils import fingerprint
    ramps = ["old_policy.schedule=paper", "old_policy.max=0.5", "old_policy.ramp=4",
             "optim.warmup_steps=4"]
    half = _run(tiny_dataset, base_model, tmp_path / "b2",
                [*ramps, "trainer.batch_size=2", "trainer.schedule_batch=4"])
    full = _run(tiny_dataset, base_model, tmp_path / "b4", [*ramps, "trainer.batch_size=4"])
    h, f = _rows(half, "train"), _rows(full, "train")
    assert [r["samples"] for r in h] == [2, 4, 6] and [r["samples"] for r in f] == [4, 8, 12]
    for rows, batch in ((h, 2), (f, 4)):
        for r in rows:
            position = (r["samples"] - batch) / 4           # samples seen before the step / 4
            assert r["old_decay"] == pytest.approx(0.5 * min(1.0, position / 4))
    assert h[2]["old_decay"] == pytest.approx(f[1]["old_decay"]) and h[2]["old_decay"] > 0
    assert h[2]["lr"] == pytest.approx(f[1]["lr"])
    assert h[0]["lr"] == pytest.approx(h[2]["lr"] / 2)      # warm-up factor (0+1)/4 vs (1+1)/4
    assert f[1]["lr"] == pytest.approx(2 * f[0]["lr"])      # in steps: (1+1)/4 vs (0+1)/4
    assert "schedule_batch" not in fingerprint.read_identity(full)["settings"]["trainer"]
    with pytest.raises(UserError, match="trainer.schedule_batch"):
        _trainer(tiny_dataset, base_model, tmp_path / "bad", ["trainer.schedule_batch=0"])
    assert not (tmp_path / "bad").exists()


def test_lora_init_seed_sets_the_init_apart_from_the_run_seed(tiny_dataset, base_model,  # noqa: F811
                                                              tmp_path):
    """``lora.init_seed`` fixes the LoRA factors' init whatever the run's seed (so a seed
    study can tell init variance from data variance); null draws it from the run's seed."""
    def factors(name, extra):
        t = _trainer(tiny_dataset, base_model, tmp_path / name, extra)
        return {k: p.detach().clone() for k, p in t.roles._named("policy") if "lora_A" in k}

    plain0, plain1 = factors("p0", ["seed=0"]), factors("p1", ["seed=1"])
    own0 = factors("o0", ["seed=0", "lora.init_seed=5"])
    own1 = factors("o1", ["seed=1", "lora.init_seed=5"])
    assert plain0 and plain0.keys() == own0.keys()
    assert all(not torch.equal(plain0[k], plain1[k]) for k in plain0)      # run seed draws it
    assert all(torch.equal(own0[k], own1[k]) for k in own0)                # init_seed fixes it
    assert all(not torch.equal(own0[k], plain0[k]) for k in own0)
    null0 = factors("n0", ["seed=0", "lora.init_seed=null"])
    assert all(torch.equal(null0[k], plain0[k]) for k in plain0)           # as before the knob


def test_adv_norm_batch_reaches_the_update(tiny_dataset, base_model, tmp_path,  # noqa: F811
                                           monkeypatch):
    """``reward.adv_norm=batch`` weighs the candidates with one std for the step's B groups
    (every rank's), and the trained weights differ from per-group std's."""
    import persistworld.trainers.post_train as pt
    from persistworld.rewards.group import group_advantages
    seen = []

    def spy(R, clip=1.0, eps=1e-6, norm="group"):
        out = group_advantages(R, clip=clip, eps=eps, norm=norm)
        seen.append((norm, R.clone(), out[1].clone()))
        return out
    monkeypatch.setattr(pt, "group_advantages", spy)
    batch = _run(tiny_dataset, base_model, tmp_path / "batch", ["reward.adv_norm=batch"])
    assert seen and {n for n, _, _ in seen} == {"batch"}
    for _, R, r in seen:
        assert R.shape[0] >= 2                               # all B groups of the step at once
        centred = R - R.mean(1, keepdim=True)
        A = centred / (centred.pow(2).mean().sqrt() + 1e-6)
        torch.testing.assert_close(r, (A.clamp(-1, 1) + 1) / 2)
    seen.clear()
    group = _run(tiny_dataset, base_model, tmp_path / "group")
    assert {n for n, _, _ in seen} == {"group"}
    a, b = _weights(batch), _weights(group)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_shuffled_rewards_reach_the_update_in_a_random_order(tiny_dataset, base_model,  # noqa: F811
                                                             tmp_path, monkeypatch):
    """``reward.shuffle=true`` (the no-signal control): each group's rewards are permuted
    within the group, the update's weights and best-of-N follow the permuted rewards, and the
    trained weights differ from the real rewards' run."""
    import persistworld.trainers.post_train as pt
    from persistworld.rewards.group import group_advantages
    shuffles, scored, kept = [], [], []
    real_shuffle, real_score, real_best = (pt.shuffle_within_groups, pt.PostTrainer.stage_score,
                                           pt.best_of_n)

    def shuffle(R, g):
        out = real_shuffle(R, g)
        shuffles.append((R.clone(), out.clone()))
        return out

    def score(self, cands, truth, at):
        scored.append(real_score(self, cands, truth, at))
        return scored[-1]

    def best(R, n):
        kept.append(R.clone())
        return real_best(R, n)
    monkeypatch.setattr(pt, "shuffle_within_groups", shuffle)
    monkeypatch.setattr(pt.PostTrainer, "stage_score", score)
    monkeypatch.setattr(pt, "best_of_n", best)
    shuffled = _run(tiny_dataset, base_model, tmp_path / "shuffled", ["reward.shuffle=true"])
    assert len(shuffles) == len(scored) == len(kept) == 3
    for (own, perm), (R, _, r, _), R_kept in zip(shuffles, scored, kept):
        assert torch.equal(perm.sort(1).values, own.sort(1).values)  # the group's own rewards
        assert torch.equal(R, perm) and torch.equal(R_kept, perm)    # best-of-N: permuted
        torch.testing.assert_close(r, group_advantages(perm)[1])     # weights: permuted
    assert any(not torch.equal(own, perm) for own, perm in shuffles)
    shuffles.clear()
    real = _run(tiny_dataset, base_model, tmp_path / "real")
    assert not shuffles                                              # off by default
    a, b = _weights(shuffled), _weights(real)
    assert any(not torch.equal(a[k], b[k]) for k in a)
