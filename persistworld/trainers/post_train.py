"""PersistWorld RL post-training (METHOD.md §2-4, Algorithm 1).

One training step, as labelled stages:
    S0 starts   B (episode, start frame) pairs and prefix lengths P, from the step's seed
    S1 prefix   roll out P chunks from each start with the model's own outputs (no grad)
    S2 branch   K candidates of F chunks from each frozen prefix, batched over all B*K
    S3 score    multi-view LPIPS/SSIM/PSNR reward vs ground truth -> group-normalised r
    S3b select  best-of-N: keep the top-n and bottom-n of each group
    S4 update   x0-adapted NFT loss (+ KL to base) on re-noised candidates, optimiser step
    S5 ema      old policy <- EMA(policy) by its schedule; optional policy EMA
    S6 record   metrics.jsonl, numbered checkpoints, status

``PostTrainer.train_step(at)`` is S0-S5 over explicit state: where training stands (``Progress``:
steps taken, samples seen), the roles' weights and the optimiser; the S4 loss is the term
``objective.name`` chooses (objectives/terms.py: one signature for every loss) plus the KL.
``PostTrainer.train`` is the thin runner around it: S6, in-training checks, checkpoints,
preemption, resume.

Several processes (torchrun, srun; trainers/distributed.py) split a step's B prefixes into
equal slices, one per rank: S0 is computed for all B and sliced, S1-S3b run on the rank's own
prefixes, S4 draws the noise of ALL kept samples (same order as one process) and uses its
slice, normalises by the global sample count and sums the gradients over ranks before
clipping; every rank then takes the same optimiser step, so the weights stay identical and
the run equals a one-process run with the same trainer.batch_size up to float rounding.
Rank 0 alone writes the run directory.

The policy, the old policy, the policy EMA and the base model share ONE frozen backbone
(trainers/adapters.py): policy = backbone + its LoRA adapter + its action encoder (trained);
old policy and policy EMA = adapters of their own, EMAs of the policy's; base = adapters
disabled, for the KL term. ``with self.roles.use(role)`` makes the model act as one of them.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from persistworld.data.dataset import SELECTION_SPLIT, EpisodeStore, RolloutDataset
from persistworld.objectives.nft import NFTVariant
from persistworld.objectives.terms import KLToBase, Samples, Term, post_training_term
from persistworld.rewards.group import (ADV_NORMS, best_of_n, group_advantages,
                                        shuffle_within_groups)
from persistworld.rewards.reward import MultiViewReward, RewardWeights
from persistworld.rollout.branching import Branches, branch, rollout_prefix
from persistworld.rollout.prefix import PrefixSampler
from persistworld.trainers.adapters import BASE, NamedAdapters
from persistworld.trainers.distributed import Dist
from persistworld.trainers.ema import EMASchedule, ema_update
from persistworld.trainers.optim import build_optimizer, warmup_cosine
from persistworld.utils import preempt
from persistworld.utils.rundir import (RunDir, hydra_overrides, rng_state, seed_everything,
                                      set_rng_state)
from persistworld.utils import fingerprint
from persistworld.utils.seeding import derive_seed
from persistworld.world_model.interface import HistoryBuffer, WorldModel
from persistworld.errors import UserError

SIGMA_SOURCES = ("lognormal", "sampler_grid")
SAMPLING_POLICIES = ("current", "old")


class Pruned(Exception):
    """Raised by ``post_train(cfg, on_eval=...)``'s callback to stop early; status "pruned"."""


# --------------------------------------------------------------------------------------------
# Settings, validated before any compute
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """The derived arithmetic of one step, printed before training starts."""

    batch_prefixes: int       # B
    group_size: int           # K
    kept_per_group: int       # 2n, or K without best-of-N
    branch_chunks: int        # F
    future: int               # L
    max_prefix_chunks: int    # max P
    start_pool_chunks: int    # chunks every start has after it (>= max P + F): the start pool
    schedule_batch: int       # the batch size the ramps' lengths are written for

    @property
    def candidates_per_step(self) -> int:
        return self.batch_prefixes * self.group_size

    @property
    def update_samples_per_step(self) -> int:
        return self.batch_prefixes * self.kept_per_group * self.branch_chunks

    @property
    def frames_needed(self) -> int:
        """Ground-truth frames after the start a training sample has (the start pool: starts
        with at least this many frames after them; rows of one ablation table set the same
        ``rollout.start_pool_chunks`` so that they draw from the same starts)."""
        return self.start_pool_chunks * self.future

    def describe(self) -> str:
        return (f"per step: {self.batch_prefixes} prefixes x K={self.group_size} candidates = "
                f"{self.candidates_per_step} rollouts of {self.branch_chunks} chunk(s); "
                f"{self.kept_per_group} kept per group -> {self.update_samples_per_step} "
                f"chunk updates; prefixes up to {self.max_prefix_chunks} chunks; starts drawn "
                f"from those with {self.start_pool_chunks} chunks ({self.frames_needed} "
                f"frames) after them; ramps in steps of {self.schedule_batch} samples")


@dataclass(frozen=True)
class Progress:
    """Where post-training stands: optimiser steps taken and samples seen, a sample being one
    prefix with its group of K candidates, counted over all processes (as EDM counts images:
    the count keeps its meaning whatever the batch size of the steps that made it). The step
    is what seeds read; the ramps and schedules (curriculum prefix, learning-rate warm-up and
    cosine, old-policy decay) read ``position``: samples seen in steps of
    ``trainer.schedule_batch`` samples, so a preset written for batch 64 (experiment=paper)
    keeps its schedule in samples when run at another batch size (``old_policy.a`` is then per
    schedule step). An EMA still applies its decay once per optimiser step. Both counts are in
    every checkpoint and metrics row."""

    step: int = 0
    samples: int = 0

    def advanced(self, prefixes: int) -> "Progress":
        return Progress(self.step + 1, self.samples + prefixes)

    def position(self, schedule_batch: int) -> float:
        """Where the ramps and schedules stand: samples seen in steps of ``schedule_batch``
        samples (``trainer.schedule_batch``; = the step itself when it is the batch size)."""
        return self.samples / schedule_batch


def validate(cfg: DictConfig, world_size: int = 1) -> tuple[Setup, PrefixSampler,
                                                            RewardWeights, EMASchedule, Term]:
    """Every impossible setting fails here with one message naming it, before any work.
    ``world_size``: processes sharing the run (each takes batch_size / world_size prefixes)."""
    r = cfg.rollout
    if cfg.trainer.get("precision", "fp32") not in ("fp32", "bf16"):
        raise UserError(f"trainer.precision: unknown {cfg.trainer.precision!r} (choose from "
                        f"fp32, bf16)")
    K = int(r.group_size)
    if K < 2:
        raise UserError(f"rollout.group_size (K) must be >= 2 to normalise within a group, "
                        f"got {K}")
    n = r.best_of_n
    if n is not None:
        n = int(n)
        if n < 1 or 2 * n > K:
            raise UserError(f"rollout.best_of_n={n} keeps top-{n} and bottom-{n}, which needs "
                            f"1 <= n and 2n <= rollout.group_size={K} (null keeps all)")
    if int(r.branch_chunks) < 1:
        raise UserError(f"rollout.branch_chunks (F) must be >= 1, got {r.branch_chunks}")
    if r.sampling_policy not in SAMPLING_POLICIES:
        raise UserError(f"rollout.sampling_policy: unknown {r.sampling_policy!r} (choose from "
                        f"{', '.join(SAMPLING_POLICIES)})")
    prefix = PrefixSampler(**OmegaConf.to_container(r.prefix, resolve=True))
    weights = RewardWeights(**{k: float(v) for k, v in cfg.reward.items()
                               if k not in ("adv_clip", "adv_norm", "shuffle")})
    if float(cfg.reward.adv_clip) <= 0:
        raise UserError(f"reward.adv_clip must be > 0, got {cfg.reward.adv_clip}")
    if cfg.reward.adv_norm not in ADV_NORMS:
        raise UserError(f"reward.adv_norm: unknown {cfg.reward.adv_norm!r} (choose from "
                        f"{', '.join(ADV_NORMS)})")
    old = EMASchedule(**OmegaConf.to_container(cfg.old_policy, resolve=True))
    o = cfg.objective
    if float(o.beta) <= 0:
        raise UserError(f"objective.beta must be > 0, got {o.beta}")
    if o.sigma not in SIGMA_SOURCES:
        raise UserError(f"objective.sigma: unknown {o.sigma!r} (choose from "
                        f"{', '.join(SIGMA_SOURCES)})")
    if float(o.w_kl) < 0:
        raise UserError(f"objective.w_kl must be >= 0, got {o.w_kl}")
    variant = NFTVariant(bool(o.inv_beta_scale), bool(o.adaptive_weighting),
                         float(cfg.reward.adv_clip) if o.adv_clip_scale else 1.0)
    term = post_training_term(o, variant)                               # objective.name
    if not 0.0 <= float(cfg.policy_ema.decay) < 1.0:
        raise UserError(f"policy_ema.decay must be in [0, 1), got {cfg.policy_ema.decay}")
    steps = r.sampler_steps
    if steps is not None and int(steps) < 1:
        raise UserError(f"rollout.sampler_steps must be >= 1 (null: the model's default), got "
                        f"{steps}")
    t = cfg.trainer
    for key in ("steps", "batch_size", "ckpt_every", "eval_chunks", "eval_samples"):
        if int(t[key]) < 1:
            raise UserError(f"trainer.{key} must be >= 1, got {t[key]}")
    schedule_batch = t.get("schedule_batch")
    if schedule_batch is not None and int(schedule_batch) < 1:
        raise UserError(f"trainer.schedule_batch must be >= 1 (null: trainer.batch_size), got "
                        f"{schedule_batch}")
    if int(t.eval_every or 0) < 0:
        raise UserError(f"trainer.eval_every must be >= 0 (0: no in-training checks), got "
                        f"{t.eval_every}")
    if t.micro_batch is not None and int(t.micro_batch) < 1:
        raise UserError(f"trainer.micro_batch must be >= 1 (null: all at once), got "
                        f"{t.micro_batch}")
    from persistworld.evaluation.run import settings_from
    settings_from({k: v for k, v in cfg.eval.items() if k != "enabled"})   # eval.* checks
    if int(t.batch_size) % world_size:
        raise UserError(f"trainer.batch_size={t.batch_size} (global prefixes per step) must be "
                        f"divisible by the number of processes ({world_size}): each process "
                        f"takes an equal slice of the prefixes")
    if cfg.lora.rank < 1:
        raise UserError(f"lora.rank must be >= 1, got {cfg.lora.rank}")
    pool = r.get("start_pool_chunks")
    setup = Setup(int(t.batch_size), K, K if n is None else 2 * n, int(r.branch_chunks),
                  int(cfg.data.future), prefix.max_chunks,
                  prefix.max_chunks + int(r.branch_chunks) if pool is None else int(pool),
                  int(t.batch_size) if schedule_batch is None else int(schedule_batch))
    if setup.start_pool_chunks < prefix.max_chunks + setup.branch_chunks:
        raise UserError(f"rollout.start_pool_chunks={pool} is shorter than the longest prefix "
                        f"plus branch ({prefix.max_chunks} + {setup.branch_chunks} chunks): "
                        f"every start must have that many chunks after it")
    return setup, prefix, weights, old, term


def start_pool(data_cfg, setup: Setup) -> RolloutDataset:
    """S0's pool: every train (episode, start) with ``setup.start_pool_chunks`` chunks of
    ground truth after it (prefix and branches use the first P + F of them)."""
    return RolloutDataset(data_cfg.root, "train", setup.start_pool_chunks, setup.future,
                          int(data_cfg.stride), starts_per_episode=None)


def check_episode_lengths(store: EpisodeStore, setup: Setup, stride: int) -> None:
    longest = max(store.entry(e)["num_steps"] for e in store.episode_ids("train"))
    need = setup.frames_needed * stride + 1
    if need > longest:
        raise UserError(f"a start pool of {setup.start_pool_chunks} chunks (prefix up to "
                        f"{setup.max_prefix_chunks} + rollout.branch_chunks="
                        f"{setup.branch_chunks}, or rollout.start_pool_chunks) needs {need} "
                        f"frames, but the longest training episode has {longest}: lower "
                        f"rollout.prefix.high / rollout.branch_chunks / "
                        f"rollout.start_pool_chunks or render longer episodes")


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class PolicyDenoiser(torch.nn.Module):
    """The trained call, ``model.denoise``, as a module's forward, so torch DDP can wrap it
    (DDP synchronises the gradients of what flows through its forward)."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor, history: torch.Tensor,
                history_actions: torch.Tensor, future_actions: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.denoise(x_sigma, sigma,
                                  HistoryBuffer(history, history_actions, context),
                                  future_actions)


class PostTrainer:
    on_eval = None      # optional callable(step, eval_metrics) after each in-training check

    def __init__(self, cfg: DictConfig, overrides: list[str] | None = None,
                 dist: Dist | None = None):
        from persistworld.world_model import load_world_model
        self.cfg = cfg
        self.overrides = hydra_overrides() if overrides is None else list(overrides)
        self.dist = Dist.plan(str(cfg.trainer.get("distributed", "auto"))) if dist is None \
            else dist
        (self.setup, self.prefix, weights, self.old_schedule,
         self.objective) = validate(cfg, self.dist.world)
        # S4's terms: the post-training loss objective.name, plus the KL to the base model
        self.terms = [(1.0, self.objective)] + ([(float(cfg.objective.w_kl), KLToBase())]
                                                if float(cfg.objective.w_kl) > 0 else [])
        self.needs = frozenset().union(*(t.needs for _, t in self.terms))
        self.store = EpisodeStore(cfg.data.root)
        check_episode_lengths(self.store, self.setup, int(cfg.data.stride))
        self.device = self.dist.device_for(cfg.trainer.device)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.dist.enabled else 1
        torch.set_num_threads(int(cfg.trainer.num_threads
                                  or max(1, (os.cpu_count() or 1) // local)))
        self.dist.start(self.device)
        # this rank's slice of the B prefixes of every step
        self.local_prefixes = self.setup.batch_prefixes // self.dist.world
        self.first_prefix = self.dist.rank * self.local_prefixes
        seed_everything(int(cfg.seed))

        base = load_world_model(cfg.base_model).to(self.device).eval()
        if (base.history, base.future) != (int(cfg.data.history), int(cfg.data.future)):
            raise UserError(f"base_model={cfg.base_model} predicts {base.future} frames from "
                            f"{base.history} (H, L = {base.history}, {base.future}) but "
                            f"data.history / data.future are {cfg.data.history} / "
                            f"{cfg.data.future}: use the data settings it was trained with")
        roles = ("policy", "old") + (("ema",) if float(cfg.policy_ema.decay) > 0 else ())
        self.model = base
        # the LoRA init draws from the run's seed in sequence, or from its own lora.init_seed
        # (then the draws that follow are the run seed's as if no init had drawn)
        init_seed = cfg.lora.init_seed
        with (contextlib.nullcontext() if init_seed is None
              else torch.random.fork_rng(devices=[])):
            if init_seed is not None:
                torch.manual_seed(int(init_seed))
            self.roles = NamedAdapters(base, roles, int(cfg.lora.rank), float(cfg.lora.alpha),
                                       list(cfg.lora.target_modules),
                                       bool(cfg.lora.train_action_encoder))
        # the trained call under torch DDP (registered while the policy's tensors are the ones
        # that require gradients; it also broadcasts rank 0's start to every rank)
        with self.roles.use("policy") as policy:
            self.policy_denoiser = self.dist.wrap(PolicyDenoiser(policy))
        for role in roles[1:]:
            self.roles.copy_("policy", role)
        self.frozen = self.roles.frozen_checksums()
        if cfg.trainer.get("gradient_checkpointing", False):
            root = base.adapter_root()
            if not hasattr(root, "enable_gradient_checkpointing"):
                raise UserError(f"trainer.gradient_checkpointing: the {type(root).__name__} "
                                f"backbone does not support it")
            root.enable_gradient_checkpointing()
        self.reward = MultiViewReward(weights, device=str(self.device))
        o = cfg.optim
        self.opt = build_optimizer(self.roles.named_trainable(), o.name, float(o.lr),
                                   float(o.weight_decay))
        self.data = start_pool(cfg.data, self.setup)
        self.progress = Progress()
        self.identity = fingerprint.run_identity(OmegaConf.to_container(cfg, resolve=True))
        # created only once the settings have passed, and only by rank 0 (the others never
        # write the run directory; they get rank 0's checkpoint through the process group)
        self.run = RunDir(cfg.run_dir) if self.dist.is_main else None

    # -- resume --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def has_ema(self) -> bool:
        return "ema" in self.roles.roles

    @property
    def eval_role(self) -> str:
        """What evaluation and the exported model use: the policy EMA when on, else the
        policy."""
        return "ema" if self.has_ema else "policy"

    @property
    def sampling_role(self) -> str:
        return "policy" if self.cfg.rollout.sampling_policy == "current" else "old"

    def state(self) -> dict:
        return {"policy": self.roles.state("policy"), "old": self.roles.state("old"),
                "ema": self.roles.state("ema") if self.has_ema else None,
                "optimizer": self.opt.state_dict(), "rng": rng_state(),
                "samples": self.progress.samples}

    def load(self, ckpt: dict) -> None:
        where = "the checkpoint being resumed"
        self.roles.load_state("policy", ckpt["policy"], where)
        self.roles.load_state("old", ckpt["old"], where)
        if self.has_ema:
            if ckpt.get("ema") is not None:
                self.roles.load_state("ema", ckpt["ema"], where)
            else:                        # cannot happen with the same fingerprint; say so
                raise UserError(f"{where} has no policy EMA but policy_ema.decay > 0")
        self.opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        # checkpoints before the samples count: every step had trainer.batch_size prefixes
        self.progress = Progress(step, int(ckpt.get("samples", step * self.setup.batch_prefixes)))

    # -- S0: starts and prefix lengths ------------------------------------------------------
    def stage_starts(self, at: Progress) -> tuple[dict, torch.Tensor, list[int]]:
        """The step's B starts, prefix lengths and seeds, drawn for all B exactly as one
        process does, then this rank's slice (all of them with one process)."""
        g = torch.Generator().manual_seed(derive_seed(int(self.cfg.seed), at.step, 0))
        B = self.setup.batch_prefixes
        idx = torch.randint(len(self.data), (B,), generator=g).tolist()
        P = self.prefix.sample(at.position(self.setup.schedule_batch), B, g)
        seeds = [derive_seed(int(self.cfg.seed), at.step, b + 1) for b in range(B)]
        mine = slice(self.first_prefix, self.first_prefix + self.local_prefixes)
        items = [self.data[i] for i in idx[mine]]
        batch = {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
                 else [it[k] for it in items] if isinstance(items[0][k], str)
                 else torch.tensor([it[k] for it in items]) for k in items[0]}
        return batch, P[mine], seeds[mine]

    # -- S1 + S2: prefix and branches -------------------------------------------------------
    def autocast(self):
        """``trainer.precision=bf16``: bfloat16 autocast around the network calls (rollouts
        and the update's forward passes); weights, optimiser state and losses stay float32."""
        if self.cfg.trainer.get("precision", "fp32") != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def stage_rollouts(self, batch: dict, P: torch.Tensor, seeds: list[int],
                       times: dict | None = None) -> tuple[Branches, torch.Tensor]:
        with self.roles.use(self.sampling_role) as sampler:
            return self._rollouts(sampler, batch, P, seeds, times)

    def _rollouts(self, sampler: WorldModel, batch: dict, P: torch.Tensor, seeds: list[int],
                  times: dict | None) -> tuple[Branches, torch.Tensor]:
        L, F = self.setup.future, self.setup.branch_chunks
        steps = self.cfg.rollout.sampler_steps
        start = sampler.encode(batch["start_frame"].unsqueeze(1).to(self.device))[:, 0]
        buffer = sampler.start_buffer(start, batch["start_action"].to(self.device),
                                      batch.get("text"))
        acts = batch["actions"].to(self.device)                          # (B, (Pmax+F)*L, A)
        t = time.perf_counter()
        with self.autocast():
            prefix = rollout_prefix(sampler, buffer, acts, P, seeds, steps)              # S1
        if times is not None:
            times["time/prefix"] = time.perf_counter() - t
        t = time.perf_counter()
        # the F*L frames right after each sample's own prefix
        rows = torch.arange(len(P))
        offs = P[:, None] * L + torch.arange(F * L)[None]                 # (B, F*L)
        branch_actions = acts[rows[:, None], offs]
        truth = batch["frames"][rows[:, None], offs]                     # (B, F*L, V, 3, h, w)
        with self.autocast():
            cands = branch(sampler, prefix, branch_actions, self.setup.group_size, F, seeds,
                           steps)                                                       # S2
        cands = cands.to_float()
        if times is not None:
            times["time/branch"] = time.perf_counter() - t
        return cands, truth

    # -- S3: rewards and group weights ------------------------------------------------------
    def stage_score(self, cands: Branches, truth: torch.Tensor, at: Progress):
        B, K = self.local_prefixes, self.setup.group_size
        with self.roles.use(self.sampling_role) as sampler:
            pixels = sampler.decode(cands.clip()).clamp(0, 1)           # (B*K, F*L, V, 3, h, w)
        # on the training device, batched (LPIPS, SSIM and PSNR where the model runs)
        target = truth.to(pixels.device).repeat_interleave(K, 0)
        R, info = self.reward(pixels, target)
        R, info = R.cpu(), {k: v.cpu() for k, v in info.items()}
        # over all B prefixes of the step (every rank's), so "batch" normalises as one process
        mine = slice(self.first_prefix, self.first_prefix + B)
        R_all = self.dist.gather_cat(R.view(B, K))
        if self.cfg.reward.shuffle:           # the control: same rewards, random candidates
            g = torch.Generator().manual_seed(derive_seed(int(self.cfg.seed), at.step, 10**6 + 1))
            R_all = shuffle_within_groups(R_all, g)
        A, r = group_advantages(R_all, clip=float(self.cfg.reward.adv_clip),
                                norm=str(self.cfg.reward.adv_norm))
        return R_all[mine], A[mine], r[mine], info

    # -- S4: the NFT update -----------------------------------------------------------------
    def sample_sigma(self, n: int, g: torch.Generator) -> torch.Tensor:
        if self.cfg.objective.sigma == "lognormal":
            return self.model.training_sigma(n, g)
        grid = self.model.sampler_sigmas(self.cfg.rollout.sampler_steps)[:-1]  # drop final 0
        return grid[torch.randint(len(grid), (n,), generator=g)]

    def stage_update(self, cands: Branches, keep: torch.Tensor, r: torch.Tensor,
                     at: Progress) -> dict:
        """keep: (b, M) kept candidate indices per group; r: (b, K) reward weights, for this
        rank's b prefixes. The noise (sigma, eps) is drawn for all B*M kept samples of the step
        at once, chunk by chunk, in one process's order, and each rank uses its own rows, in
        micro-batches of ``trainer.micro_batch`` (all at once by default): any number of
        processes and any micro-batch size see the same sigma and eps per sample, so they
        change memory, not the result (up to float rounding of the summed gradients). Every
        rank makes the same number of backward passes; torch DDP averages the gradients over
        the ranks in the last one (``no_sync`` before it), so each rank's loss is scaled by
        the world size to give one process's sum."""
        K = self.setup.group_size
        flat = (keep + torch.arange(keep.shape[0])[:, None] * K).flatten()  # (b*M,) local
        r_kept = r.flatten()[flat].to(self.device)
        n_local = len(flat)
        n_total = n_local * self.dist.world                                # B*M, global
        first = self.dist.rank * n_local                    # this rank's first global sample
        g = torch.Generator().manual_seed(derive_seed(int(self.cfg.seed), at.step, 10**6))
        self.model.train()
        self.opt.zero_grad()
        parts: dict[str, float] = {"loss": 0.0}     # + the terms' parts (same order per rank)
        F = len(cands.latents)
        frac = 1.0 / (n_total * F)                           # global normalisation
        micro = int(self.cfg.trainer.micro_batch or n_local)
        passes, last = 0, F * math.ceil(n_local / micro) - 1
        for c in range(F):
            sigma_all = self.sample_sigma(n_total, g)                    # every kept sample
            eps_all = torch.randn((n_total, *cands.latents[c].shape[1:]), generator=g)
            for s in range(0, n_local, micro):
                lo, hi = first + s, first + min(s + micro, n_local)    # global rows
                sync = passes == last or not self.dist.enabled
                passes += 1
                sel = flat[lo - first:hi - first]
                x0 = cands.latents[c][sel]                                 # (m, L, C, Hs, Ws)
                buf = cands.buffers[c].select(sel)
                acts = cands.actions[c][sel]
                sigma = sigma_all[lo:hi].to(self.device)
                eps = eps_all[lo:hi].to(self.device)
                x_sigma = x0 + sigma.view(-1, *[1] * (x0.dim() - 1)) * eps
                # all but the last pass accumulate gradients locally (DDP's no_sync)
                with contextlib.nullcontext() if sync else self.policy_denoiser.no_sync():
                    with self.autocast():                # network calls only; losses fp32
                        with self.roles.use("policy"):
                            x0_theta = self.policy_denoiser(x_sigma, sigma, buf.latents,
                                                            buf.actions, acts,
                                                            buf.context).float()
                        x0_old = x0_base = None
                        with torch.no_grad():
                            if "x0_old" in self.needs:
                                with self.roles.use("old") as old:
                                    x0_old = old.denoise(x_sigma, sigma, buf, acts).float()
                            if "x0_base" in self.needs:
                                with self.roles.use(BASE) as base:   # adapters off
                                    x0_base = base.denoise(x_sigma, sigma, buf, acts).float()
                    kept = Samples(x0, sigma, r=r_kept[lo - first:hi - first], x0_old=x0_old,
                                   x0_base=x0_base)
                    loss, logged = 0.0, {}
                    for weight, term in self.terms:                  # one signature each
                        out = term(x0_theta, kept)
                        loss = loss + weight * out["loss"]
                        if term is self.objective:                   # loss/pos, loss/neg
                            logged.update({f"loss/{k}": v for k, v in out.items()
                                           if k != "loss"})
                        else:                            # an added term, unweighted: loss/kl
                            logged[f"loss/{term.name}"] = out["loss"]
                    (loss.sum() * (frac * self.dist.world)).backward()   # DDP averages
                parts["loss"] += loss.sum().item() * frac
                if x0_old is not None:
                    logged["old_deviation"] = (x0_theta.detach() - x0_old).pow(2).flatten(1) \
                        .mean(1).sqrt()
                for k, v in logged.items():
                    parts[k] = parts.get(k, 0.0) + v.sum().item() * frac
        params = self.roles.params("policy")
        if self.dist.enabled:                     # logged sums over ranks = one process's
            totals = torch.tensor([parts[k] for k in parts], dtype=torch.float64)
            self.dist.all_reduce_(totals)
            parts = dict(zip(parts, totals.tolist()))
        clip = float(self.cfg.optim.grad_clip or 0)
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        ref = self.setup.schedule_batch        # warm-up and cosine in steps of ref samples
        self.opt.set_lr_factor(warmup_cosine(
            at.position(ref), int(self.cfg.optim.warmup_steps),
            int(self.cfg.trainer.steps) * self.setup.batch_prefixes / ref))
        self.opt.step()
        self.model.eval()
        parts["grad_norm"] = float(gnorm)
        parts["lr"] = float(self.opt.param_groups[0]["lr"])
        return parts

    # -- S5: EMA of the old policy and of the policy ----------------------------------------
    def stage_ema(self, at: Progress) -> float:
        d = self.old_schedule.decay(at.position(self.setup.schedule_batch))
        ema_update(self.roles.params("old"), self.roles.params("policy"), d)
        if self.has_ema:
            ema_update(self.roles.params("ema"), self.roles.params("policy"),
                       float(self.cfg.policy_ema.decay))
        return d

    # -- one step of Algorithm 1 ------------------------------------------------------------
    def train_step(self, at: Progress) -> tuple[Progress, dict]:
        """S0-S5 at ``at``, then where training stands after it and the step's metrics (over
        all B prefixes). What the step reads is ``at`` (its seeds, prefix lengths, learning
        rate and old-policy decay come from it), the roles' weights and the optimiser; what it
        changes is those weights and the optimiser. Recording, checks, checkpoints and
        preemption are the runner's (``train``)."""
        d, times = self.dist, {}
        batch, P, seeds = self.stage_starts(at)                                     # S0
        cands, truth = self.stage_rollouts(batch, P, seeds, times)                  # S1 + S2
        t = time.perf_counter()
        R, A, r, info = self.stage_score(cands, truth, at)                          # S3
        keep = best_of_n(R, self.cfg.rollout.best_of_n)                             # S3b
        times["time/reward"] = time.perf_counter() - t
        t = time.perf_counter()
        parts = self.stage_update(cands, keep, r, at)                               # S4
        times["time/update"] = time.perf_counter() - t
        decay = self.stage_ema(at)                                                  # S5
        # metrics over all B prefixes: gather every rank's (rank order = B order)
        R, A, P = d.gather_cat(R), d.gather_cat(A), d.gather_cat(P)
        info = {k: d.gather_cat(v) for k, v in info.items()}
        if d.enabled:                           # the slowest rank's time for each stage
            slowest = torch.tensor([times[k] for k in times], dtype=torch.float64)
            times = dict(zip(times, d.all_reduce_(slowest, "max").tolist()))
        after = at.advanced(self.setup.batch_prefixes)
        clip = float(self.cfg.reward.adv_clip)
        return after, {**parts, **times, "old_decay": decay, "samples": after.samples,
                       "reward/mean": R.mean(), "reward/std": R.std(unbiased=False),
                       "reward/group_std": R.std(1, unbiased=False).mean(),
                       "adv/abs_mean": A.abs().mean(),
                       "adv/clipped_frac": (A.abs() > clip).float().mean(),
                       "kept_frac": keep.shape[1] / self.setup.group_size,
                       "prefix/mean": P.float().mean(),
                       **{f"reward/{k}": v.mean() for k, v in info.items()},
                       **{f"reward_std/{k}": v.std(unbiased=False) for k, v in info.items()}}

    # -- the runner -------------------------------------------------------------------------
    def train(self) -> Path:
        cfg, run, d = self.cfg, self.run, self.dist
        root = Path(cfg.run_dir)
        # rank 0 reads the run directory and decides; the other ranks follow (and get rank 0's
        # checkpoint through the process group, so they need not see the directory)
        what, ckpt = d.main_only(self.plan_start)
        if what == "completed":
            if d.is_main:
                print(f"{run.root} is already completed; nothing to do (delete it or choose "
                      f"another run_dir to train again)")
            return root / "model.pt"
        if what == "finish":
            return self.finish()            # killed during the final evaluation: redo only that
        if d.is_main:
            self.record_identity()          # first: a config.yaml never lacks its fingerprint
            run.write_config(OmegaConf.to_yaml(cfg, resolve=True), self.overrides)
        if ckpt is not None:
            self.load(ckpt)
            if d.is_main:
                run.truncate_metrics_after(self.step)
                run.log(f"resumed from step {self.step}")
        del ckpt
        if d.is_main:
            print(self.setup.describe())
            if d.enabled:
                run.log(f"{d.world} processes ({d.launcher}, {d.backend}), "
                        f"{self.local_prefixes} prefix(es) each")
            run.set_status("running", self.step)
        self.check_replicas()
        total = int(cfg.trainer.steps)
        bar = tqdm(total=total, initial=self.step, desc="post-train", unit="step",
                   disable=not d.is_main or (not sys.stderr.isatty()
                                             and not cfg.trainer.progress))
        try:
            while self.step < total:
                self.progress, metrics = self.train_step(self.progress)      # S0-S5
                self.check_frozen()
                if d.is_main:
                    run.log_metrics(self.step, "train", metrics)                    # S6
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                R=f"{float(metrics['reward/mean']):.3f}")
                every = int(cfg.trainer.eval_every or 0)
                if every and (self.step % every == 0 or self.step == total):
                    d.main_only(self.check_and_report)                              # S6b
                # a preemption signal on any rank stops every rank at the same step
                stop = preempt.requested()
                if d.enabled:
                    stop = bool(d.all_reduce_(torch.tensor([float(stop)]), "max").item())
                if self.step % int(cfg.trainer.ckpt_every) == 0 or self.step == total or stop:
                    self.check_replicas()
                    if d.is_main:                # SLURM time limit / preemption: checkpoint,
                        run.save_checkpoint(self.step, self.state())       # then requeue
                if stop:
                    raise KeyboardInterrupt("preempted: checkpoint saved, requeueing")
        except BaseException as e:
            if d.is_main:
                if isinstance(e, Pruned):
                    run.set_status("pruned", self.step)
                elif isinstance(e, KeyboardInterrupt):
                    run.set_status("interrupted", self.step)
                else:
                    run.mark_failed(e, self.step)
            raise
        finally:
            bar.close()
        return self.finish()

    def plan_start(self) -> tuple[str, dict | None]:
        """(rank 0) "completed", "finish" (only the final evaluation is left) or "train" with
        the checkpoint to resume from (None: from scratch)."""
        plan = run_plan(self.run.root, self.identity, self.cfg)
        if plan == "completed":
            return "completed", None
        if plan == "evaluate" or (plan == "resume" and self.final_model_written()):
            step = int(self.run.read_status().get("step", 0) or 0)
            self.progress = Progress(step, step * self.setup.batch_prefixes)
            return "finish", None
        if plan == "extend":             # more steps of the same run: its old results go
            self.run.set_status("running", int(self.run.read_status().get("step", 0)))
            import shutil
            (self.run.root / "model.pt").unlink(missing_ok=True)
            shutil.rmtree(self.run.root / "eval", ignore_errors=True)
            self.run.log(f"extending to trainer.steps={self.identity['steps']}")
        return "train", self.run.load_latest_checkpoint()

    def check_and_report(self) -> None:
        """(rank 0) S6b: the in-training check, logged, then the on_eval callback."""
        check = self.stage_check()
        self.run.log_metrics(self.step, "eval", check)
        if self.on_eval is not None:
            self.on_eval(self.step, check)              # may raise Pruned (search/driver.py)

    def check_replicas(self) -> None:
        """With several processes, every rank must hold bit-identical trainable weights (the
        same summed gradients and the same optimiser step); a cheap checksum, compared."""
        if not self.dist.enabled:
            return
        sums = torch.stack([p.detach().double().sum().cpu() for role in self.roles.roles
                            for p in self.roles.params(role)])
        every = self.dist.gather_cat(sums[None])
        for rank in range(1, len(every)):
            if not torch.equal(every[rank], every[0]):
                raise AssertionError(f"step {self.step}: the weights of rank {rank} differ "
                                     f"from rank 0's (data-parallel replicas diverged)")

    def record_identity(self) -> None:
        """(rank 0) fingerprint.json, and the fingerprint and code version in every status; a
        change of code alone since the run started is logged and kept in the status."""
        old = fingerprint.read_identity(self.run.root)
        ident = dict(self.identity)
        if old is not None and old.get("code") != ident["code"]:
            ident["code_history"] = [*old.get("code_history", [old.get("code")]), ident["code"]]
            self.run.log(f"code changed since the run started: {old.get('code')} -> "
                         f"{ident['code']} (same settings, base model and data)")
        fingerprint.write_identity(self.run.root, ident)
        self.run.status_extra = {"fingerprint": ident["fingerprint"][:16],
                                 "code": ident["code"],
                                 **({"code_history": ident["code_history"]}
                                    if "code_history" in ident else {})}

    def check_frozen(self) -> None:
        if self.step in (1, int(self.cfg.trainer.steps)):
            now = self.roles.frozen_checksums()
            for n, c in self.frozen.items():
                if not torch.equal(now[n], c):
                    raise AssertionError(f"frozen parameter {n} changed during post-training")

    # -- S6b: in-training check on held-out episodes (for curves and Optuna pruning) --------
    def stage_check(self) -> dict:
        from persistworld.evaluation.evaluate import EvalSettings, evaluate, flat_metrics
        from persistworld.evaluation.evaluate import model_predictor
        e = self.cfg.eval
        s = EvalSettings(split=SELECTION_SPLIT, num_chunks=int(self.cfg.trainer.eval_chunks),
                         max_samples=int(self.cfg.trainer.eval_samples), batch_size=e.batch_size,
                         num_steps=e.num_steps, seed=int(e.seed), num_videos=0, masked=False)
        with self.roles.use(self.eval_role) as model:
            summary = evaluate(model_predictor(model), self.cfg.data.root, None, s,
                               future=self.setup.future, stride=int(self.cfg.data.stride),
                               lpips_device=str(self.device), progress=False)
        return flat_metrics(summary["metrics"], prefix="val/")

    # -- S7: the post-trained model and its own evaluation ----------------------------------
    def final_model_written(self) -> bool:
        """model.pt is this run's final model (written, then the status moved on from
        running); only its evaluation may be left to do."""
        return self.run.read_status().get("state") in ("evaluating", "completed") \
            and (self.run.root / "model.pt").exists()

    def finish(self) -> Path:
        from persistworld.evaluation.run import evaluate_model, settings_from
        from persistworld.world_model import save_world_model
        path = Path(self.cfg.run_dir) / "model.pt"

        def write_model() -> None:
            if not self.final_model_written():
                save_world_model(self.model, path,
                                 state_dict=self.roles.merged_state_dict(self.eval_role))
                self.run.set_status("evaluating", self.step)

        self.dist.main_only(write_model)    # every rank returns once model.pt is written
        if not self.dist.is_main:
            return path                     # the final evaluation is rank 0's alone
        e = self.cfg.eval
        if e.enabled:
            from persistworld.evaluation.evaluate import is_current
            s = settings_from({k: v for k, v in e.items() if k != "enabled"})
            out = self.run.eval_dir(f"{s.mode}_{s.num_chunks}")
            if not is_current(out, s, self.cfg.data.root):
                try:
                    evaluate_model(str(path), self.cfg.data, s, out, str(self.device))
                except BaseException as err:
                    self.run.mark_failed(err, self.step)
                    raise
        self.run.set_status("completed", self.step)
        return path


def run_plan(run_dir: str | Path, identity: dict, cfg: DictConfig) -> str:
    """What a (re)launch does with ``run_dir``: "new", "resume" (same fingerprint, not
    finished), "extend" (completed, same fingerprint, more trainer.steps), "evaluate" (completed,
    but its final evaluation is missing or was made with other eval settings or data) or
    "completed". Any other difference raises ``StaleRun`` naming the settings: a relaunch never
    reports (or continues) a run that is not the one asked for."""
    root = Path(run_dir)
    status = RunDir(root).read_status() if (root / "status.json").exists() else {}
    old = fingerprint.read_identity(root)
    if old is None:
        if not status and not (root / "config.yaml").exists():
            return "new"
        raise StaleRun(f"{root} holds a run without a fingerprint (made by an older "
                       f"persistworld, or not by post-train): it cannot be checked against "
                       f"these settings; delete it, choose another run_dir, or relaunch the "
                       f"sweep with --fresh")
    diff = fingerprint.differences(old, identity)
    if diff:
        raise StaleRun(f"{root} holds a run with other settings ({', '.join(diff[:8])}); use "
                       f"the same settings, choose another run_dir, or relaunch the sweep "
                       f"with --fresh (starts such runs afresh, keeping the old ones aside)")
    done = int(status.get("step", 0) or 0)
    if identity["steps"] < done:
        raise StaleRun(f"{root} has trained {done} steps but trainer.steps={identity['steps']}"
                       f": a shorter run is another run; choose another run_dir (or --fresh)")
    if status.get("state") != "completed":
        return "resume" if status else "new"
    if identity["steps"] > done:
        return "extend"
    e = cfg.eval
    if e.enabled:
        from persistworld.evaluation.evaluate import is_current
        from persistworld.evaluation.run import settings_from
        s = settings_from({k: v for k, v in e.items() if k != "enabled"})
        if not is_current(root / "eval" / f"{s.mode}_{s.num_chunks}", s, cfg.data.root):
            return "evaluate"
    return "completed"


class StaleRun(UserError):
    """A run directory holds another run than the one asked for (its fingerprint differs)."""


def post_train(cfg: DictConfig, on_eval=None, overrides: list[str] | None = None) -> Path:
    """`persistworld post-train [overrides]`: RL post-training, then its evaluation.
    ``on_eval(step, metrics)`` is called after each in-training check and may raise Pruned.
    Under torchrun / srun with several tasks (trainer.distributed=auto) every process calls
    this; they share the run (see trainers/distributed.py)."""
    dist = Dist.plan(str(cfg.trainer.get("distributed", "auto")))
    if not dist.enabled:                 # a completed run: nothing is loaded
        validate(cfg)
        identity = fingerprint.run_identity(OmegaConf.to_container(cfg, resolve=True))
        if run_plan(cfg.run_dir, identity, cfg) == "completed":
            print(f"{cfg.run_dir} is already completed; nothing to do (delete it or choose "
                  f"another run_dir to train again)")
            return Path(cfg.run_dir) / "model.pt"
    try:
        trainer = PostTrainer(cfg, overrides, dist)
        trainer.on_eval = on_eval
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=trainer.device.type != "cpu")
        try:
            return trainer.train()
        finally:
            torch.use_deterministic_algorithms(was)
    finally:
        dist.close()
