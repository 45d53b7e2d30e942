"""Typed schemas of the `post_train` config, registered in Hydra's ConfigStore.

Each section of `post_train.yaml` is a config group (`rollout/`, `reward/`, ...) whose
`default.yaml` extends the schema stored here under `<group>/schema`, and `post_train.yaml`
itself extends `post_train_schema`. Key paths are the same as in the old flat file
(`optim.lr`, `rollout.prefix.strategy`, ...). A typo'd key or a value of the wrong type fails
at compose time with Hydra's own message ("Key 'lrr' not in 'OptimConf'", "Value 'abc' could
not be converted to Integer"). Choices and ranges are checked by
`persistworld.trainers.post_train.validate`, which names the setting.

Units are in the comments: chunks (L frames each), steps (gradient updates), frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PrefixConf:
    strategy: str = "uniform"        # uniform | fixed | curriculum
    low: int = 0                     # chunks (fixed: the prefix length)
    high: int = 9                    # chunks, inclusive (paper: P ~ U{0..9})
    ramp_steps: int = 1000           # steps; curriculum only: until `high` is reachable


@dataclass
class RolloutConf:
    prefix: PrefixConf = field(default_factory=PrefixConf)
    group_size: int = 8              # K candidates per prefix (paper: 16)
    branch_chunks: int = 1           # F chunks per candidate (paper: 1)
    best_of_n: Optional[int] = 2     # keep top-n + bottom-n per group; null keeps all (paper: 5)
    sampling_policy: str = "current"  # current | old: which policy samples prefixes/branches
    sampler_steps: Optional[int] = None  # Euler steps in RL rollouts; null = model default
    start_pool_chunks: Optional[int] = None  # chunks every start has after it; null = max
    #   prefix + branch_chunks. The rows of a table set the table's largest (conf/row/), so
    #   that they draw their starts from one pool and differ only in their factor


@dataclass
class RewardConf:
    w_lpips: float = 1.0             # weight of (1 - LPIPS), unitless
    w_ssim: float = 1.0              # weight of SSIM, unitless
    w_psnr: float = 0.03125          # weight of PSNR, per dB (1/32)
    wrist_weight: float = 1.0        # wrist view vs each external view (Table 8 uses 2)
    adv_clip: float = 1.0            # advantage clip c, in the std units adv_norm picks
    adv_norm: str = "group"          # group (paper): A in each group's std | batch: one std
    shuffle: bool = False            # control: each group's rewards go to its candidates in a
                                     #   random order (the same update, no reward signal)


@dataclass
class ObjectiveConf:
    name: str = "nft"                # nft (paper) | rwr (objectives/terms.py)
    beta: float = 1.0                # NFT mixing coefficient
    sigma: str = "lognormal"         # lognormal (EDM training) | sampler_grid
    w_kl: float = 1.0e-4             # KL to the base model (adapters off); 0 = off
    inv_beta_scale: bool = False     # DiffusionNFT: loss / beta
    adaptive_weighting: bool = False  # DiffusionNFT: divide by detached mean |error|
    adv_clip_scale: bool = False     # DiffusionNFT: multiply by reward.adv_clip


@dataclass
class OldPolicyConf:
    schedule: str = "paper"          # none|frozen|copy|paper|linear|affine (trainers/ema.py)
    max: float = 0.5                 # EMA decay ceiling, in [0, 1]
    ramp: int = 500                  # steps (paper schedule reaches `max` at step `ramp`)
    a: float = 0.001                 # decay increase per step (linear / affine)
    start: float = 0.2               # decay at step 0 (affine)


@dataclass
class PolicyEmaConf:
    decay: float = 0.0               # EMA of the trained weights for eval/export; 0 = off


@dataclass
class LoraConf:
    rank: int = 16                   # adapter rank r (paper: 64)
    alpha: float = 16                # LoRA scale numerator (scale = alpha / rank; paper: 64)
    target_modules: List[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_action_encoder: bool = True
    init_seed: Optional[int] = None  # seed of the LoRA factors' random init (null: the run's
                                     #   seed, drawn in sequence as always)


@dataclass
class OptimConf:
    name: str = "adamw"              # adamw | muon (Muon for 2-D weights, AdamW for the rest)
    lr: float = 1.0e-4               # peak learning rate
    weight_decay: float = 0.0        # decoupled, per step x lr
    warmup_steps: int = 0            # steps of linear warmup
    grad_clip: float = 1.0           # max global grad norm; 0 = off


@dataclass
class TrainerConf:
    steps: int = 200                 # gradient updates (paper: 8000)
    batch_size: int = 2              # B prefixes per step, each with its own group (paper: 64)
    schedule_batch: Optional[int] = None  # the batch the ramps' lengths are written for: ramps
                                     #   advance by samples seen / schedule_batch; null = batch_size
    micro_batch: Optional[int] = None  # candidates per backward pass (per process); null = all
    ckpt_every: int = 25             # steps between numbered checkpoints
    eval_every: int = 0              # steps between in-training held-out checks; 0 = off
    eval_chunks: int = 2             # chunks rolled out per check
    eval_samples: int = 8            # held-out rollouts per check
    device: str = "cpu"              # torch device (cpu | cuda | cuda:N)
    num_threads: Optional[int] = None  # torch CPU threads; null = all cores
    progress: bool = True            # tqdm bar
    precision: str = "fp32"          # fp32 | bf16 (autocast around the network calls; GPU)
    gradient_checkpointing: bool = False  # recompute the backbone's activations in the update's
                                     #   backward pass (less memory, more time; same result)
    distributed: str = "auto"        # auto: one process per torchrun/srun task when launched
                                     #   with several (WORLD_SIZE / SLURM_NTASKS > 1); off


@dataclass
class EvalConf:
    enabled: bool = True             # the run's own evaluation of its final model
    split: str = "test"              # train | val (choose settings) | test (report)
    num_chunks: int = 10             # chunks per rollout (paper ablations: 10; Table 1: 14)
    mode: str = "autoregressive"     # autoregressive | teacher_forced
    max_samples: Optional[int] = None  # rollouts; null = one per held-out episode
    starts_per_episode: int = 1
    batch_size: int = 8              # rollouts per forward batch
    num_steps: Optional[int] = None  # sampler steps; null = the model's default
    seed: int = 0
    num_videos: int = 4              # side-by-side GIFs
    masked: bool = True              # object-only / robot-only metrics (Table 2)


@dataclass
class SweepConf:
    """Where an ablation sweep puts its runs: <out>/<table>/<row>/seed=<seed> (no timestamps,
    so relaunching a sweep finds its runs again: completed ones are skipped, others resume)."""
    out: str = "sweeps_out/default"  # root folder of the sweep's run directories
    table: str = "none"              # ablation (a folder under `out`), set by the row preset
    row: str = "none"                # row of the ablation table, set by the row preset


@dataclass
class PostTrainConf:
    seed: int = 0                    # master seed of the run
    base_model: str = "runs/base/default"  # base run directory (its model.pt) or a model.pt
    run_dir: str = "runs/post/default"     # this run's directory (resumes if it exists)
    data: Any = None                 # the dataset group (conf/data/*.yaml)
    rollout: RolloutConf = field(default_factory=RolloutConf)
    reward: RewardConf = field(default_factory=RewardConf)
    objective: ObjectiveConf = field(default_factory=ObjectiveConf)
    old_policy: OldPolicyConf = field(default_factory=OldPolicyConf)
    policy_ema: PolicyEmaConf = field(default_factory=PolicyEmaConf)
    lora: LoraConf = field(default_factory=LoraConf)
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    eval: EvalConf = field(default_factory=EvalConf)
    sweep: SweepConf = field(default_factory=SweepConf)


GROUPS = {"rollout": RolloutConf, "reward": RewardConf, "objective": ObjectiveConf,
          "old_policy": OldPolicyConf, "policy_ema": PolicyEmaConf, "lora": LoraConf,
          "optim": OptimConf, "trainer": TrainerConf, "eval": EvalConf}


def register() -> None:
    """Store the schemas (idempotent): `post_train_schema` and `<group>/schema`."""
    cs = ConfigStore.instance()
    cs.store(name="post_train_schema", node=PostTrainConf)
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)


register()
