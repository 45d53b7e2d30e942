"""Teacher-forced base training of the world model (METHOD.md §1): ``persistworld train-base``.

One step, as labelled stages:
    S0 batch    the clips of step s are drawn from a generator seeded by (seed, s): no loader
                state, so a resumed run sees exactly the batches it would have seen
    S1 encode   ground-truth history and future frames -> latents (history = ground truth)
    S2 loss     EDM denoising loss on the L future frames (log-normal sigma, loss weight),
                per sample, reduced here by the mean
    S3 update   AdamW, global grad-norm clip, warmup + cosine/constant LR
    S4 record   metrics.jsonl every step, held-out one-chunk validation every eval_every steps,
                atomic numbered checkpoints, status.json

A checkpoint holds model, optimizer, scheduler, step, RNG states and the data position, so
``kill -9`` followed by a rerun of the same command ends with bit-identical weights (CPU, same
seed, same ``trainer.num_threads``). The run ends by writing ``<run_dir>/model.pt`` (weights +
world-model config), which ``persistworld.world_model.load_world_model`` reads.
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from persistworld.objectives.denoising import denoising_loss, draw_noise
from persistworld.utils.rundir import (RunDir, hydra_overrides, rng_state, seed_everything,
                                      set_rng_state)
from persistworld.utils.seeding import derive_seed
from persistworld.world_model import (MODEL_FILE, build_world_model, save_world_model,
                                      world_model_config)
from persistworld.world_model.interface import HistoryBuffer, WorldModel
from persistworld.errors import UserError

CKPT_FORMAT = "persistworld.train_base"
_BATCH_STREAM, _NOISE_STREAM, _VAL_STREAM = 0, 1, 2      # sub-seeds of derive_seed(seed, ...)


# --------------------------------------------------------------------------------------------
# Data position: the batch of step s depends on (seed, s) only
# --------------------------------------------------------------------------------------------
def step_indices(num_clips: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Clip indices of step ``step`` (uniform with replacement)."""
    g = torch.Generator().manual_seed(derive_seed(seed, step, _BATCH_STREAM))
    return torch.randint(num_clips, (batch_size,), generator=g).tolist()


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the clip indices of steps ``start .. stop-1`` (a DataLoader ``batch_sampler``)."""

    def __init__(self, num_clips: int, batch_size: int, seed: int, start: int, stop: int):
        self.num_clips, self.batch_size, self.seed = num_clips, batch_size, seed
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.stop):
            yield step_indices(self.num_clips, self.batch_size, self.seed, s)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine to min_ratio or flat."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Settings, validated before any compute
# --------------------------------------------------------------------------------------------
SCHEDULES = ("cosine", "constant")


def validate(cfg: DictConfig) -> None:
    t = cfg.trainer
    positive = ("steps", "batch_size", "ckpt_every", "log_every", "num_threads")
    for key in positive:
        if int(t[key]) < 1:
            raise UserError(f"trainer.{key} must be >= 1, got {t[key]}")
    if float(t.lr) <= 0:
        raise UserError(f"trainer.lr must be > 0, got {t.lr}")
    if float(t.get("aux_lr_scale", 1.0)) <= 0:
        raise UserError(f"trainer.aux_lr_scale must be > 0, got {t.aux_lr_scale}")
    if float(t.get("motion_weight", 0.0)) < 0:
        raise UserError(f"trainer.motion_weight must be >= 0, got {t.motion_weight}")
    warm = int(t.get("aux_warmup_steps", 0))
    if warm < 0 or warm >= int(t.steps):
        raise UserError(f"trainer.aux_warmup_steps must be in [0, trainer.steps={t.steps}), got "
                        f"{warm}")
    if warm and not cfg.world_model.get("silhouettes"):
        raise UserError("trainer.aux_warmup_steps > 0 fits the world model's side modules "
                        "first, and it has none: set world_model.silhouettes=true or "
                        "trainer.aux_warmup_steps=0")
    if str(t.schedule) not in SCHEDULES:
        raise UserError(f"trainer.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
    if int(t.eval_sample_clips) > int(t.eval_clips):
        raise UserError("trainer.eval_sample_clips must be <= trainer.eval_clips")
    if t.get("init_from"):
        init_path(t.init_from)
    wm = world_model_config(cfg.world_model)
    if (wm.history, wm.future) != (int(cfg.data.history), int(cfg.data.future)):
        raise UserError(f"world_model history/future ({wm.history}, {wm.future}) must match "
                        f"data.history/future ({cfg.data.history}, {cfg.data.future})")


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
            else torch.tensor([it[k] for it in items]) for k in items[0]}


def _cache_all_episodes(ds) -> None:
    """Decode each episode file once per process (the reader's own cache holds 64)."""
    if hasattr(ds, "_episodes"):
        ds._episodes = lru_cache(maxsize=None)(ds.store.load)


# --------------------------------------------------------------------------------------------
# Held-out one-chunk validation on fixed clips, sigmas and noise
# --------------------------------------------------------------------------------------------
def _batch_to(batch: dict, model: WorldModel, device: torch.device):
    """S1 encode: a collated clip batch -> (x0 (N, L, ...), HistoryBuffer, future poses)."""
    x0 = model.encode(batch["future_frames"].to(device))                  # (N, L, C, Hs, Ws)
    hist = model.encode(batch["hist_frames"].to(device))                  # (N, H, C, Hs, Ws)
    return x0, HistoryBuffer(hist, batch["hist_actions"].to(device)), \
        batch["future_actions"].to(device)


def _frames_and_masks(batch: dict, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every frame's pose (N, H+L, A), class mask (N, H+L, V, h, w) and pixels (N, H+L, V, 3,
    h, w) of a clip batch, for ``WorldModel.auxiliary_losses``."""
    both = [torch.cat([batch[f"hist_{k}"], batch[f"future_{k}"]], 1).to(device)
            for k in ("actions", "masks", "frames")]
    return tuple(both)


def lognormal_quantiles(n: int, p_mean: float, p_std: float) -> torch.Tensor:
    """(n,) deterministic noise levels covering the training distribution evenly."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.exp(p_mean + p_std * torch.special.ndtri(u)).float()


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def validate_one_chunk(model: WorldModel, batch: dict, seed: int, sample_clips: int,
                       sampler_steps: int, device: torch.device, micro: int = 8) -> dict:
    """Validation loss (fixed sigma quantiles and noise) on all clips; for the first
    ``sample_clips`` also a sampled chunk vs the "repeat the last frame" baseline (pixels in
    [0, 1], MSE/PSNR per clip, averaged)."""
    model.eval()
    wm = model.cfg
    x0, buffer, acts = _batch_to(batch, model, device)
    N = x0.shape[0]
    g = torch.Generator().manual_seed(derive_seed(seed, _VAL_STREAM))
    sigma = lognormal_quantiles(N, wm.p_mean, wm.p_std).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    losses, mses = [], []
    for s in range(0, N, micro):
        sl = slice(s, s + micro)
        out = denoising_loss(model, x0[sl], buffer.select(sl),
                             acts[sl], sigma[sl], eps[sl])
        losses.append(out["loss"])
        mses.append(out["mse"])
    row = {"val/loss": torch.cat(losses).mean().item(), "val/mse": torch.cat(mses).mean().item()}
    row.update({f"val/{k}": v.mean().item()
                for k, v in model.auxiliary_losses(*_frames_and_masks(batch, device)).items()})
    if sample_clips > 0:
        n = sample_clips
        sub = buffer.select(slice(0, n))
        noise = torch.randn((n, *x0.shape[1:]), generator=g).to(device)
        pred = model.decode(model.sample_chunk(sub, acts[:n], noise=noise,
                                               num_steps=sampler_steps)).clamp(0, 1).cpu()
        truth = batch["future_frames"][:n]                                   # (n, L, V, 3, h, w)
        last = batch["hist_frames"][:n, -1:].expand_as(truth)
        mse_model = (pred - truth).pow(2).flatten(1).mean(1)
        mse_repeat = (last - truth).pow(2).flatten(1).mean(1)
        row.update({"val/psnr": _psnr(mse_model).mean().item(),
                    "val/psnr_repeat_last": _psnr(mse_repeat).mean().item(),
                    "val/mse_pixels": mse_model.mean().item(),
                    "val/mse_pixels_repeat_last": mse_repeat.mean().item()})
    return row


def init_path(init: str | Path) -> Path:
    """The model file ``trainer.init_from`` names (a file, or a run directory's model.pt)."""
    path = Path(str(init))
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"trainer.init_from={init}: no such model file (a run's {MODEL_FILE} or "
                        f"an exported model such as models/mini_droid_base.pt)")
    return path


def grow_input_channels(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The source weights laid into the target's shapes where the target only has MORE input
    channels (dim 1 of a conv / linear weight): the source fills the leading channels and the
    new ones start at zero, so the grown model computes exactly what the source did until
    training uses the new inputs (new inputs are appended after the old ones, as
    ``pose_maps`` appends its maps). Returns (state dict, names of the grown tensors)."""
    out, grown = {}, []
    for k, v in source.items():
        t = target.get(k)
        if t is not None and t.shape != v.shape and t.dim() == v.dim() >= 2 \
                and t.shape[0] == v.shape[0] and t.shape[2:] == v.shape[2:] \
                and t.shape[1] > v.shape[1]:
            w = torch.zeros_like(t)
            w[:, :v.shape[1]] = v
            out[k], v = w, w
            grown.append(k)
        out[k] = v.float()
    return out, grown


# submodules a model may add under ``trainer.init_from`` besides whole top-level ones
ADDABLE_SUBMODULES = ("head.gate",)      # world_model.output_gate


def _init_weights(model: WorldModel, init: str | Path) -> list[str]:
    """``trainer.init_from``: start a new run from the weights of a model file (a run's
    model.pt or an exported one) of the same architecture; settings that only shape training
    or sampling (noise levels, history noise, sampler) may differ, and so may added inputs
    (``pose_maps``, ``silhouettes``: ``grow_input_channels``) and whole added modules (the
    ``silhouettes`` decoder and the ``output_gate`` start fresh). A resumed run ignores it:
    its checkpoint holds the weights. Returns the names of the grown tensors and added
    modules."""
    from persistworld.world_model import load_world_model
    path = init_path(init)
    source = load_world_model(path)
    target = model.state_dict()
    weights, grown = grow_input_channels(target, source.state_dict())
    # a module the source lacks entirely (``silhouettes``; the FrameHead's ``OutputGate``)
    # keeps its fresh initialisation
    def module(key: str) -> str:
        sub = next((m for m in ADDABLE_SUBMODULES if key.startswith(m + ".")), None)
        return sub or key.split(".", 1)[0]
    have = {module(k) for k in weights}
    added = sorted({module(k) for k in target if module(k) not in have})
    weights.update({k: v for k, v in target.items() if module(k) in added})
    grown += [f"{m} (new module)" for m in added]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"trainer.init_from={path} holds another architecture than "
                        f"world_model.*: {str(e).splitlines()[0]}") from None
    return grown


def fill_pose_map_geometry(cfg: DictConfig, store) -> None:
    """``world_model.pose_maps=true`` without cameras: take them (and the pose range) from
    the dataset, so the resolved config and the model file hold them."""
    wm = cfg.world_model
    if not wm.get("pose_maps") or wm.get("pose_map_cameras"):
        return
    with open_dict(cfg):
        for key, value in store.pose_map_geometry().items():
            wm[key] = value


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
def train_base(cfg: DictConfig) -> Path:
    """Train (or resume, or do nothing if completed) and return ``<run_dir>/model.pt``."""
    from persistworld.data.dataset import ClipDataset
    validate(cfg)
    t = cfg.trainer
    model_path = Path(cfg.run_dir) / MODEL_FILE
    if (Path(cfg.run_dir) / "status.json").exists():
        status = RunDir(cfg.run_dir).read_status()
        if status.get("state") == "completed" and int(status.get("step", 0)) >= int(t.steps) \
                and model_path.exists():
            print(f"train-base: {cfg.run_dir} already completed {status['step']} steps; nothing "
                  f"to do (delete the folder or choose another run_dir to train again)")
            return model_path

    # the data first: a missing dataset must not leave an empty run directory behind
    train_ds = ClipDataset.from_config(cfg.data, "train")
    val_ds = ClipDataset.from_config(cfg.data, "val")
    fill_pose_map_geometry(cfg, train_ds.store)
    run = RunDir(cfg.run_dir)
    torch.set_num_threads(int(t.num_threads))
    device = torch.device(t.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # bit-exact resume on CPU; on CUDA deterministic cuBLAS would need CUBLAS_WORKSPACE_CONFIG,
    # so there it only warns about non-deterministic ops
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        return _train(cfg, run, train_ds, val_ds, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: DictConfig, run: RunDir, train_ds, val_ds, device: torch.device) -> Path:
    t = cfg.trainer
    model_path = run.root / MODEL_FILE
    seed = int(cfg.seed)
    seed_everything(seed)
    if bool(t.cache_episodes):
        _cache_all_episodes(train_ds)
    model = build_world_model(cfg.world_model).to(device)
    wm_config = model.config_dict()
    params = [p for p in model.parameters() if p.requires_grad]
    side = {id(p) for m in model.auxiliary_modules() for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in side]}]
    if side:            # the side modules' own learning rate (they start fresh under init_from)
        groups.append({"params": [p for p in params if id(p) in side],
                       "lr": float(t.lr) * float(t.get("aux_lr_scale", 1.0))})
    opt = torch.optim.AdamW(groups, lr=float(t.lr), betas=tuple(t.betas),
                            weight_decay=float(t.weight_decay))
    steps = int(t.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, int(t.warmup_steps), steps, str(t.schedule), float(t.min_lr_ratio)))

    # -- resume ---------------------------------------------------------------------------
    step = 0
    ckpt = run.load_latest_checkpoint(map_location=device)
    if ckpt is not None:
        if ckpt.get("format") != CKPT_FORMAT:
            raise UserError(f"{run.checkpoint_dir} holds checkpoints of another stage; choose "
                            f"another run_dir")
        if ckpt["world_model"] != wm_config:
            raise UserError(f"{run.root} was trained with a different world_model config; "
                            f"choose another run_dir (or delete it) to change the model")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        run.truncate_metrics_after(step)
        run.log(f"resuming from step {step}")
        print(f"train-base: resuming {run.root} from step {step}")
    elif t.get("init_from"):
        grown = _init_weights(model, t.init_from)
        extra = (f" (new input channels zero-initialised or new modules: {', '.join(grown)})"
                 if grown else "")
        run.log(f"weights initialised from {t.init_from}{extra}")
        print(f"train-base: weights initialised from {t.init_from}{extra}")
    run.write_config(OmegaConf.to_yaml(cfg, resolve=True), hydra_overrides())
    run.set_status("running", step)

    n_params = sum(p.numel() for p in params)
    B = int(t.batch_size)
    msg = (f"train-base: {n_params / 1e6:.2f}M parameters; {len(train_ds)} train / "
           f"{len(val_ds)} val clips; {steps} steps x {B} clips = {steps * B} clips "
           f"({steps * B / len(train_ds):.1f} epochs); latent {tuple(model.latent_shape())} "
           f"per frame; run dir {run.root}")
    print(msg)
    run.log(msg)

    eval_every, eval_clips = int(t.eval_every), int(t.eval_clips)
    val_batch = None
    if eval_every > 0 and eval_clips > 0:
        g = torch.Generator().manual_seed(derive_seed(seed, _VAL_STREAM, 0))
        idx = torch.randperm(len(val_ds), generator=g)[:eval_clips].tolist()
        val_batch = _collate([val_ds[i] for i in idx])

    def checkpoint(at: int) -> None:
        run.save_checkpoint(at, {
            "format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng_state(), "world_model": wm_config,
            "data_position": {"sampler": "step_indices(seed, step)", "seed": seed,
                              "next_step": at, "batch_size": B},
            "config": OmegaConf.to_container(cfg, resolve=True)}, keep_last=int(t.keep_checkpoints))

    def evaluate(at: int) -> None:
        row = validate_one_chunk(model, val_batch, seed, int(t.eval_sample_clips),
                                 int(t.eval_sampler_steps), device)
        run.log_metrics(at, "eval", row)
        tqdm_write(f"step {at}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))

    from tqdm.auto import tqdm
    tqdm_write = tqdm.write
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatchSampler(len(train_ds), B, seed, step, steps),
        num_workers=int(t.num_workers), collate_fn=_collate,
        persistent_workers=False)
    bar = tqdm(total=steps, initial=step, desc="train-base", dynamic_ncols=True,
               disable=None)
    log_every, acc, acc_n, t_last = int(t.log_every), {}, 0, time.time()
    motion_weight = float(t.get("motion_weight", 0.0))
    aux_warmup = int(t.get("aux_warmup_steps", 0))
    if motion_weight > 0 and not hasattr(model, "motion_weight"):
        raise UserError(f"trainer.motion_weight: the {type(model).__name__} backend has no "
                        f"latent-space mask weighting; set it to 0")
    try:
        if step == 0 and val_batch is not None:
            evaluate(0)
        for batch in loader:
            # S1 encode, S2 loss (randomness from (seed, step) only)
            model.train()
            x0, buffer, acts = _batch_to(batch, model, device)
            g = torch.Generator().manual_seed(derive_seed(seed, step, _NOISE_STREAM))
            sigma, eps, hist_eps, hist_level = draw_noise(model, x0, buffer.latents, g)
            aux = model.auxiliary_losses(*_frames_and_masks(batch, device))
            loss = sum(v.mean() for v in aux.values())
            parts = {f"aux/{k}": v.mean().item() for k, v in aux.items()}
            if step >= aux_warmup:        # before: S0, the side modules alone (they start fresh)
                weight = (model.motion_weight(batch["future_masks"].to(device), motion_weight)
                          if motion_weight > 0 else None)
                out = denoising_loss(model, x0, buffer, acts, sigma, eps,
                                     model.training_history_noise(), hist_eps, hist_level,
                                     weight)
                loss = loss + out["loss"].mean()
                parts.update(loss=out["loss"].mean().item(), mse=out["mse"].mean().item())
            # S3 update
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = float(t.grad_clip or 0)
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            # S4 record
            for k, v in (*parts.items(), ("grad_norm", gnorm.item())):
                total, n = acc.get(k, (0.0, 0))
                acc[k] = (total + v, n + 1)
            acc_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % log_every == 0 or step == steps:
                now = time.time()
                run.log_metrics(step, "train", {**{k: v / n for k, (v, n) in acc.items()},
                                                "lr": lr, "sec_per_step": (now - t_last) / acc_n})
                acc, acc_n, t_last = {}, 0, now
            if val_batch is not None and (step % eval_every == 0 or step == steps):
                evaluate(step)
            if step % int(t.ckpt_every) == 0 or step == steps:
                checkpoint(step)
                run.set_status("running", step)
        save_world_model(model, model_path, extra={"step": step, "trained_by": "train_base"})
        run.set_status("completed", step)
        run.log(f"completed {step} steps; wrote {model_path}")
        tqdm_write(f"train-base: completed {step} steps; model in {model_path}")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            run.set_status("interrupted", step)
        else:
            run.mark_failed(e, step)
        raise
    finally:
        bar.close()
    return model_path


if __name__ == "__main__":
    import hydra
    hydra.main(config_path="pkg://persistworld.conf", config_name="train_base",
               version_base="1.3")(train_base)()
