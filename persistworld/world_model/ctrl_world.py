"""The Ctrl-World backend (``world_model=ctrl_world``): the published model behind our contract.

What is built (../shared/docs/CTRL_WORLD.md lists the facts; this is our own code):

    pixels (B, T, V=3, 3, 192, 320) in [0, 1]
      -> AutoencoderKLTemporalDecoder, per view   latent_dist.mode() * 0.18215 -> (4, 24, 40)
      -> views stacked along height               one frame latent (4, 72, 40): rows 0-23 ext1,
                                                  24-47 ext2, 48-71 wrist
    decode: per view, ``decode(z / 0.18215, num_frames=n)`` in chunks of ``decode_chunk`` (7)
    frames, as Ctrl-World does (the temporal decoder mixes the frames inside a chunk).

The chunk convention, mapped explicitly. Ctrl-World's UNet sees an 11-frame window

    slot   0 .. 5      6          7 .. 10
           history     current    new frames
           (gathered)  (re-predicted)

with the current frame's latent / 0.18215 on channels 4-7 of every slot (SVD's channel
concatenation) and one cross-attention token per slot (``ActionEncoder`` of the 11 poses). In
our contract a chunk is the L = 4 NEW frames (slots 7-10) and their 4 poses; the current frame
and its pose are the newest entry of the ``HistoryBuffer``; the six history slots are gathered
from the buffer by the history policy:

    sparse      Ctrl-World's memory: ``history_idx`` (replay script [0, 0, -8, -6, -4, -2], policy
                script [0, 0, -12, -9, -6, -3]) in its units, where entries are chunk ends:
                its index -k is frame offset -(1 + L (k - 1)) of our frame-by-frame buffer (-1
                the current frame), and 0 is the oldest frame the buffer holds (the
                observed first frame, back-filled, while fewer than ``memory`` frames were
                generated: exactly Ctrl-World's 24 copies of the first latent).
    contiguous  the H frames right before the current one (our embedded model's rule).

The buffer keeps ``memory`` frames (``WorldModel.start_buffer``). Slot 6 is generated like the
others and then discarded (``current_slot: generate``, Ctrl-World's sampler; its noise is the
first of the chunk's L + 1 noise frames), or, with ``current_slot: replace``, it is held at the
known current latent noised to each step's sigma with a fixed noise (the "replacement" trick
for known frames). ``denoise`` (used by the NFT loss on 4 noisy new frames) always fills slot 6
that way: its input is then a properly noised current frame, never a clean one.

Preconditioning and sampler: EDM x0 with sigma_data = 1 (``edm.py``, METHOD.md §1), which is
exactly SVD's v-prediction ``EulerDiscreteScheduler`` (tested against it:
``tests/test_ctrl_world.py``): Karras sigmas ``sigma_min`` .. ``sigma_max`` (0.002 .. 700), rho
7, 50 steps, timestep 0.25 ln sigma, first state noise * sqrt(sigma_max^2 + 1) as diffusers
scales it. History slots enter unscaled (as Ctrl-World's pipeline feeds them). Per-frame
classifier-free guidance (zeroed tokens; scale linspace(1, 2) over slots 6-10) is an option,
off by default because RL post-training samples without it (the paper).

Text (``text_cond``, the released model's setting): CLIP ViT-B/32's projected text embedding
(512) tiled to 1024 is added to every pose token; it is computed once per rollout
(``encode_text``) and travels in ``HistoryBuffer.context``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from persistworld.errors import MissingFile, UserError
from persistworld.world_model import edm
from persistworld.world_model.interface import HistoryBuffer, WorldModel

HISTORY_POLICIES = ("sparse", "contiguous")
CURRENT_SLOTS = ("generate", "replace")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# prefixes of the released checkpoint that the backend does not build: SVD's CLIP image
# encoder (loaded but unused by Ctrl-World), and the CLIP text encoder unless text_cond: the one
# explicit key map of ``load_released_checkpoint``
IMAGE_ENCODER, TEXT_ENCODER = "image_encoder.", "text_encoder."
CLIP_URL = "https://huggingface.co/openai/clip-vit-base-patch32"
CHECKPOINT_URL = "https://huggingface.co/yjguo/Ctrl-World (file checkpoint-10000.pt)"
SVD_URL = "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid"


DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "conf" / "world_model" / "ctrl_world.yaml"


def defaults() -> dict:
    """The settings of ``conf/world_model/ctrl_world.yaml``."""
    import yaml
    return yaml.safe_load(DEFAULTS_FILE.read_text())


@dataclass
class CtrlWorldConfig:
    """``world_model=ctrl_world`` settings. Their defaults and documentation live in ONE place,
    ``conf/world_model/ctrl_world.yaml``; ``from_mapping`` fills what a mapping leaves out from
    it."""

    name: str
    history: int
    future: int
    views: int
    image_height: int
    image_width: int
    action_dim: int
    history_policy: str
    history_idx: list
    memory: int
    current_slot: str
    # UNetSpatioTemporalConditionModel (SVD's configuration)
    block_out_channels: list
    down_block_types: list
    up_block_types: list
    layers_per_block: int
    num_attention_heads: list
    cross_attention_dim: int
    addition_time_embed_dim: int
    # AutoencoderKLTemporalDecoder (SVD's configuration)
    vae_block_out_channels: list
    vae_layers_per_block: int
    latent_channels: int
    scaling_factor: float
    decode_chunk: int
    # action encoder 7 -> d -> d -> d (d = cross_attention_dim)
    action_hidden: int
    text_cond: bool
    clip_path: str | None
    # SVD's added_time_ids = (fps, motion bucket, noise augmentation)
    fps: int
    motion_bucket_id: int
    noise_aug: float
    # EDM
    p_mean: float
    p_std: float
    sigma_min: float
    sigma_max: float
    rho: float
    num_steps: int
    guidance: bool
    guidance_min: float
    guidance_max: float
    current_noise_seed: int
    # execution
    dtype: str
    # weights (build time only; a saved model.pt holds its weights itself)
    checkpoint: str | None
    svd_path: str | None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "CtrlWorldConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"unknown world_model settings {unknown} for world_model=ctrl_world; "
                            f"known: {sorted(known)}")
        merged = {**defaults(), **cfg}
        out = cls(**{k: list(v) if isinstance(v, (list, tuple)) else v
                     for k, v in merged.items()})
        out.validate()
        return out

    def validate(self) -> None:
        def bad(key: str, why: str):
            raise UserError(f"world_model.{key}={getattr(self, key)!r}: {why}")
        if self.history_policy not in HISTORY_POLICIES:
            bad("history_policy", f"choose from {', '.join(HISTORY_POLICIES)}")
        if self.current_slot not in CURRENT_SLOTS:
            bad("current_slot", f"choose from {', '.join(CURRENT_SLOTS)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose from {', '.join(DTYPES)}")
        if self.history_policy == "sparse":
            if len(self.history_idx) != self.history:
                bad("history_idx", f"needs world_model.history={self.history} entries")
            if any(int(i) > 0 for i in self.history_idx):
                bad("history_idx", "entries are 0 (the first frame) or negative (chunk ends)")
            if self.memory < self.span:
                bad("memory", f"the sparse history reaches {self.span} frames back: memory must "
                              f"be at least that")
        elif self.memory != self.history + 1:
            bad("memory", f"the contiguous history policy keeps history + 1 = "
                          f"{self.history + 1} frames")
        if self.action_hidden != self.cross_attention_dim:
            bad("action_hidden", f"the action tokens are the cross-attention input: must equal "
                                 f"cross_attention_dim={self.cross_attention_dim}")
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, key)) != n:
                bad(key, f"needs one entry per UNet level ({n}, block_out_channels)")
        down = 2 ** (len(self.vae_block_out_channels) - 1)
        if self.image_height % down or self.image_width % down:
            bad("image_height", f"the image {self.image_height}x{self.image_width} must be "
                                f"divisible by the VAE's downsampling {down}")
        C, hs, ws = self.latent_shape
        unet_down = 2 ** (n - 1)
        if hs % unet_down or ws % unet_down:
            bad("image_width", f"the {hs}x{ws} latent grid must be divisible by the UNet's "
                               f"downsampling {unet_down}")
        if self.text_cond and not self.clip_path:
            bad("clip_path", f"text_cond=true needs the CLIP text model's config and tokenizer "
                             f"(a local copy of {CLIP_URL}); its weights come from the "
                             f"checkpoint")
        if self.decode_chunk < 1:
            bad("decode_chunk", "must be >= 1")
        edm.karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def span(self) -> int:
        """Frames from the oldest gathered entry to the current one (sparse policy)."""
        ks = [-int(i) for i in self.history_idx if int(i) < 0]
        return 1 + self.future * (max(ks, default=1) - 1)

    @property
    def vae_down(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h, w = self.image_height // self.vae_down, self.image_width // self.vae_down
        return self.latent_channels, self.views * h, w


def _stock_unet_class():
    from diffusers import UNetSpatioTemporalConditionModel
    return UNetSpatioTemporalConditionModel


def frame_level_unet_class():
    """diffusers' ``UNetSpatioTemporalConditionModel`` with Ctrl-World's one change:
    ``encoder_hidden_states`` (B, F, D) is one cross-attention token PER FRAME, handed to the
    cross-attention blocks as (B*F, 1, D), instead of one token repeated over the frames. Same
    parameter names as the stock class (a checkpoint of either loads strictly into the other).
    The stock forward runs unchanged; forward pre-hooks on the cross-attention blocks swap in
    the per-frame tokens (so no diffusers code is copied). As in Ctrl-World, the temporal
    transformer blocks then attend to the first frame's token (diffusers' own rule)."""
    stock = _stock_unet_class()

    class FrameLevelUNet(stock):
        _frame_tokens: torch.Tensor | None = None

        def _install_hooks(self) -> None:
            if getattr(self, "_hooked", False):
                return
            for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
                if getattr(block, "has_cross_attention", False):
                    block.register_forward_pre_hook(self._swap_tokens, with_kwargs=True)
            self._hooked = True

        def _swap_tokens(self, module, args, kwargs):
            if self._frame_tokens is not None:
                kwargs["encoder_hidden_states"] = self._frame_tokens
            return args, kwargs

        def forward(self, sample, timestep, encoder_hidden_states, added_time_ids,
                    return_dict: bool = True, frame_level_cond: bool = True):
            if not frame_level_cond:
                return super().forward(sample, timestep, encoder_hidden_states, added_time_ids,
                                       return_dict=return_dict)
            B, F = sample.shape[:2]
            if encoder_hidden_states.shape[:2] != (B, F):
                raise ValueError(f"frame-level tokens must be (B, F, D) = ({B}, {F}, D), got "
                                 f"{tuple(encoder_hidden_states.shape)}")
            self._install_hooks()
            self._frame_tokens = encoder_hidden_states.reshape(B * F, 1, -1)
            try:
                return super().forward(sample, timestep, encoder_hidden_states[:, :1],
                                       added_time_ids, return_dict=return_dict)
            finally:
                self._frame_tokens = None

    FrameLevelUNet.__name__ = FrameLevelUNet.__qualname__ = "FrameLevelUNet"
    return FrameLevelUNet


def unet_kwargs(cfg: CtrlWorldConfig) -> dict:
    return dict(in_channels=2 * cfg.latent_channels, out_channels=cfg.latent_channels,
                down_block_types=tuple(cfg.down_block_types),
                up_block_types=tuple(cfg.up_block_types),
                block_out_channels=tuple(cfg.block_out_channels),
                addition_time_embed_dim=cfg.addition_time_embed_dim,
                projection_class_embeddings_input_dim=3 * cfg.addition_time_embed_dim,
                layers_per_block=cfg.layers_per_block,
                cross_attention_dim=cfg.cross_attention_dim,
                num_attention_heads=tuple(cfg.num_attention_heads),
                num_frames=cfg.history + 1 + cfg.future)


def build_vae(cfg: CtrlWorldConfig):
    from diffusers import AutoencoderKLTemporalDecoder
    n = len(cfg.vae_block_out_channels)
    return AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
        scaling_factor=cfg.scaling_factor)


class ActionEncoder(nn.Module):
    """Ctrl-World's pose encoder: Linear(7, d) - SiLU - Linear(d, d) - SiLU - Linear(d, d),
    per frame, no position embedding (attribute path ``action_encoder.action_encode``, as in
    the released checkpoint). (B, F, A) -> (B, F, d)."""

    def __init__(self, action_dim: int, hidden: int):
        super().__init__()
        self.action_encode = nn.Sequential(nn.Linear(action_dim, hidden), nn.SiLU(),
                                           nn.Linear(hidden, hidden), nn.SiLU(),
                                           nn.Linear(hidden, hidden))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        return self.action_encode(actions)


class CtrlWorldModel(WorldModel):
    """SVD UNet with frame-level tokens + temporal VAE + pose encoder (module docstring)."""

    def __init__(self, cfg: CtrlWorldConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.history, self.future = cfg.history, cfg.future
        self.unet = frame_level_unet_class()(**unet_kwargs(cfg))
        self.vae = build_vae(cfg)
        self.vae.requires_grad_(False)          # frozen, as in Ctrl-World
        self.action_encoder = ActionEncoder(cfg.action_dim, cfg.action_hidden)
        self.text_encoder, self.tokenizer = build_text_encoder(cfg) if cfg.text_cond else (None,
                                                                                         None)
        self._current_eps: dict = {}
        if cfg.checkpoint:
            load_released_checkpoint(self, cfg.checkpoint)
        elif cfg.svd_path:
            load_svd_weights(self, cfg.svd_path)

    # -- contract helpers ----------------------------------------------------------------------
    @property
    def memory(self) -> int:
        return int(self.cfg.memory)

    @property
    def noise_frames(self) -> int:
        return self.future + (self.cfg.current_slot == "generate")

    def config_dict(self) -> dict:
        # the weights travel in model.pt itself: rebuilding must not reload the sources
        return {**asdict(self.cfg), "checkpoint": None, "svd_path": None}

    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape

    def adapter_root(self) -> nn.Module:
        return self.unet

    def training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return edm.sample_training_sigma(n, generator, self.cfg.p_mean, self.cfg.p_std)

    def sampler_sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        c = self.cfg
        return edm.karras_sigmas(int(num_steps or c.num_steps), c.sigma_min, c.sigma_max, c.rho)

    def _autocast(self, device: torch.device):
        dtype = DTYPES[self.cfg.dtype]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # -- working space: temporal VAE per view, views stacked along height -------------------
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, V, 3, h, w) in [0, 1] -> (B, T, 4, V*h/8, w/8): the posterior mean (Ctrl-World
        draws ``latent_dist.sample()``; the mean makes encoding deterministic)."""
        B, T, V = frames.shape[:3]
        x = frames.reshape(B * T * V, *frames.shape[3:]) * 2 - 1
        with self._autocast(frames.device):
            z = self.vae.encode(x).latent_dist.mode().float() * self.cfg.scaling_factor
        z = z.reshape(B, T, V, *z.shape[1:])                        # (B, T, V, 4, hs, ws)
        return torch.cat(z.unbind(2), dim=-2)                       # views along height

    def split_views(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, V*hs, ws) -> (B, T, V, C, hs, ws)."""
        return torch.stack(latents.chunk(self.cfg.views, dim=-2), dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, 4, V*hs, ws) -> (B, T, V, 3, h, w) in [0, 1] (unclamped): each view's frames
        through the temporal decoder in chunks of ``decode_chunk``, all views and samples of a
        chunk in one call."""
        z = self.split_views(latents).transpose(1, 2)               # (B, V, T, C, hs, ws)
        B, V, T = z.shape[:3]
        out = []
        with self._autocast(latents.device):
            for s in range(0, T, self.cfg.decode_chunk):
                part = z[:, :, s:s + self.cfg.decode_chunk]
                n = part.shape[2]
                pix = self.vae.decode(part.reshape(B * V * n, *z.shape[3:])
                                      / self.cfg.scaling_factor, num_frames=n).sample
                out.append(pix.float().reshape(B, V, n, *pix.shape[1:]))
        return ((torch.cat(out, 2).transpose(1, 2) + 1) / 2)

    # -- history policy ---------------------------------------------------------------------
    def frame_offsets(self) -> list[int]:
        """Offsets into the buffer (negative, from its end) of the H history slots."""
        if self.cfg.history_policy == "contiguous":
            return list(range(-self.history - 1, -1))
        M, L = self.memory, self.future
        return [-M if int(i) == 0 else -(1 + L * (-int(i) - 1)) for i in self.cfg.history_idx]

    def gather(self, buffer: HistoryBuffer) -> tuple[torch.Tensor, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]:
        """History slots (B, H, C, Hs, Ws) + their poses (B, H, A), and the current frame
        (B, C, Hs, Ws) + its pose (B, A): the newest buffer entry."""
        if buffer.latents.shape[1] != self.memory:
            raise UserError(f"the ctrl_world buffer must hold world_model.memory="
                            f"{self.memory} frames, got {buffer.latents.shape[1]} (start "
                            f"rollouts with model.start_buffer)")
        idx = torch.tensor([self.memory + o for o in self.frame_offsets()],
                           device=buffer.latents.device)
        return (buffer.latents[:, idx], buffer.actions[:, idx],
                buffer.latents[:, -1], buffer.actions[:, -1])

    # -- the network --------------------------------------------------------------------------
    def added_time_ids(self, n: int, device, dtype) -> torch.Tensor:
        c = self.cfg
        return torch.tensor([[c.fps, c.motion_bucket_id, c.noise_aug]], device=device,
                            dtype=dtype).expand(n, 3)

    def network(self, window_in: torch.Tensor, noise_cond: torch.Tensor,
                history: torch.Tensor, current: torch.Tensor, tokens: torch.Tensor
                ) -> torch.Tensor:
        """The raw UNet on the 11-slot window. window_in: the L+1 generated slots already
        scaled by c_in (B, L+1, C, Hs, Ws); noise_cond (B,) = 0.25 ln sigma; history (B, H, ...)
        unscaled; current (B, C, Hs, Ws); tokens (B, H+1+L, d). Returns F for the L+1 slots."""
        B = window_in.shape[0]
        x = torch.cat([history.to(window_in.dtype), window_in], 1)          # (B, 11, C, ...)
        cond = (current / self.cfg.scaling_factor)[:, None].expand_as(x)
        ids = self.added_time_ids(B, x.device, x.dtype)
        with self._autocast(x.device):
            out = self.unet(torch.cat([x, cond.to(x.dtype)], 2), noise_cond, tokens, ids,
                            return_dict=False)[0]
        return out[:, self.history:].to(window_in.dtype)

    def tokens(self, hist_actions: torch.Tensor, current_action: torch.Tensor,
               future_actions: torch.Tensor, context: torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, H + 1 + L, d): one pose token per window slot, plus the text embedding on
        every token when the model is text-conditioned (as Ctrl-World adds it)."""
        tok = self.action_encoder(torch.cat([hist_actions, current_action[:, None],
                                             future_actions], 1))
        if self.cfg.text_cond:
            if context is None:
                raise UserError("world_model.text_cond=true: this rollout has no task text "
                                "(start it with model.start_buffer(..., texts))")
            tok = tok + context[:, None].to(tok.dtype)
        return tok

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor | None:
        """(B, 1024): CLIP ViT-B/32's projected text embedding (512) twice, as Ctrl-World tiles
        it to the token width; None without ``text_cond``."""
        if not self.cfg.text_cond:
            return None
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        emb = self.text_encoder(**{k: v.to(device) for k, v in enc.items()}).text_embeds
        reps = self.cfg.cross_attention_dim // emb.shape[-1]
        return emb.float().repeat(1, reps)

    def _x0(self, window: torch.Tensor, sigma: torch.Tensor, history: torch.Tensor,
            current: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x0_hat of the L+1 generated slots (B, L+1, ...) at noise level sigma (B,), with
        per-frame classifier-free guidance when ``guidance``."""
        F = lambda x_in, nc: self.network(x_in, nc, history, current, tokens)  # noqa: E731
        x0 = edm.precondition(F, window, sigma)
        if not self.cfg.guidance:
            return x0
        uncond = edm.precondition(
            lambda x_in, nc: self.network(x_in, nc, history, current,
                                          torch.zeros_like(tokens)), window, sigma)
        w = torch.linspace(self.cfg.guidance_min, self.cfg.guidance_max, window.shape[1],
                           device=window.device, dtype=window.dtype).reshape(1, -1, 1, 1, 1)
        return uncond + w * (x0 - uncond)

    def current_eps(self, like: torch.Tensor) -> torch.Tensor:
        """The fixed standard-normal noise (C, Hs, Ws) of the current slot."""
        key = (like.device, like.dtype)
        if key not in self._current_eps:
            g = torch.Generator().manual_seed(int(self.cfg.current_noise_seed))
            self._current_eps[key] = torch.randn(self.latent_shape(), generator=g).to(
                device=like.device, dtype=like.dtype)
        return self._current_eps[key]

    def _noised_current(self, current: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (current + sigma.reshape(-1, 1, 1, 1).to(current) * self.current_eps(current)
                )[:, None]

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, buffer: HistoryBuffer,
                future_actions: torch.Tensor) -> torch.Tensor:
        """x_sigma (B, L, C, Hs, Ws) of the new frames, sigma (B,) -> x0_hat (B, L, ...); the
        current slot is the known current latent noised to sigma (module docstring)."""
        if x_sigma.shape[1] != self.future or future_actions.shape[1] != self.future:
            raise UserError(f"expected {self.future} new frames and poses, got "
                            f"{x_sigma.shape[1]} and {future_actions.shape[1]}")
        hist, hist_act, cur, cur_act = self.gather(buffer)
        sigma = sigma.reshape(-1).expand(x_sigma.shape[0]).to(x_sigma)
        window = torch.cat([self._noised_current(cur, sigma), x_sigma], 1)
        return self._x0(window, sigma, hist, cur,
                        self.tokens(hist_act, cur_act, future_actions, buffer.context))[:, 1:]

    @torch.no_grad()
    def sample_chunk(self, buffer: HistoryBuffer, future_actions: torch.Tensor,
                     generator: torch.Generator | None = None, num_steps: int | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C, Hs, Ws): Euler on the Karras schedule over the L + 1 generated slots (one
        network call per step, two with guidance); ``noise`` (B, noise_frames, C, Hs, Ws)."""
        B = future_actions.shape[0]
        if noise is None:
            noise = torch.randn((B, self.noise_frames, *self.latent_shape()),
                                generator=generator)
        device = buffer.latents.device
        noise = noise.to(device=device, dtype=buffer.latents.dtype)
        hist, hist_act, cur, cur_act = self.gather(buffer)
        tokens = self.tokens(hist_act, cur_act, future_actions, buffer.context)
        sigmas = self.sampler_sigmas(num_steps).to(device)
        if self.cfg.current_slot == "replace":     # slot 0 is overwritten before every call
            noise = torch.cat([torch.zeros_like(noise[:, :1]), noise], 1)

        def denoise_fn(x, s):
            if self.cfg.current_slot == "replace":
                x = torch.cat([self._noised_current(cur, s), x[:, 1:]], 1)
            return self._x0(x, s, hist, cur, tokens)

        # diffusers starts from noise * sqrt(sigma_max^2 + 1) (its init_noise_sigma)
        scale = math.sqrt(float(sigmas[0]) ** 2 + 1) / float(sigmas[0])
        return edm.euler_sample(denoise_fn, noise * scale, sigmas)[:, 1:]


def build_text_encoder(cfg: CtrlWorldConfig):
    """CLIP's text model with projection, from the config in ``clip_path`` (random weights:
    the released checkpoint carries them as ``text_encoder.*``), and its tokenizer."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection
    root = Path(cfg.clip_path)
    if not (root / "config.json").is_file():
        raise MissingFile(f"world_model.clip_path={root}: no config.json; download {CLIP_URL} "
                          f"(`huggingface-cli download openai/clip-vit-base-patch32 "
                          f"--local-dir DIR`)")
    config = CLIPTextConfig.from_pretrained(root)
    if config.projection_dim * (cfg.cross_attention_dim // config.projection_dim) \
            != cfg.cross_attention_dim:
        raise UserError(f"world_model.clip_path={root}: projection_dim {config.projection_dim} "
                        f"does not tile the token width {cfg.cross_attention_dim}")
    model = CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(root, use_fast=False)


# ---- weights -------------------------------------------------------------------------------
def load_released_checkpoint(model: CtrlWorldModel, path: str | Path) -> None:
    """Load Ctrl-World's ``checkpoint-10000.pt`` (a plain state dict of the ``CrtlWorld``
    module) strictly: every ``unet.*``, ``vae.*`` and ``action_encoder.*`` tensor we build must be
    there with its shape (``text_encoder.*`` too when ``text_cond``), and nothing else may be,
    except the modules we do not build (``image_encoder.*``, ``text_encoder.*`` without
    ``text_cond``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"world_model.checkpoint={path}: no such file; download "
                          f"{CHECKPOINT_URL} and point world_model.checkpoint at it")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file and the fix
        raise UserError(f"world_model.checkpoint={path} cannot be read as a torch state dict "
                        f"({e}); download it again from {CHECKPOINT_URL}") from e
    if not isinstance(sd, Mapping):
        raise UserError(f"world_model.checkpoint={path} is not a state dict")
    skip = (IMAGE_ENCODER,) + (() if model.cfg.text_cond else (TEXT_ENCODER,))
    if not model.cfg.text_cond and any(k.startswith(TEXT_ENCODER) for k in sd):
        warnings.warn(f"{path} holds a text encoder (the released model was trained with task "
                      f"texts on its tokens); without world_model.text_cond=true "
                      f"world_model.clip_path=DIR it is conditioned on poses alone",
                      stacklevel=2)
    ours = {k: v for k, v in sd.items() if not k.startswith(skip)}
    own = model.state_dict()
    missing = sorted(set(own) - set(ours))
    unexpected = sorted(set(ours) - set(own))
    shapes = sorted(k for k in set(own) & set(ours) if own[k].shape != ours[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:3]})" if shapes else ""]
        raise UserError(f"world_model.checkpoint={path} does not fit the configured model: "
                        f"{'; '.join(p for p in parts if p)}; keep conf/world_model/"
                        f"ctrl_world.yaml's SVD architecture settings for the released file")
    model.load_state_dict(ours, strict=True)


def load_svd_weights(model: CtrlWorldModel, svd_path: str | Path) -> None:
    """SVD's own UNet and VAE weights from a local diffusers folder (``unet/``, ``vae/``), the
    start of Ctrl-World's training; the action encoder keeps its fresh initialisation."""
    from diffusers import AutoencoderKLTemporalDecoder
    root = Path(svd_path)
    for sub in ("unet", "vae"):
        if not (root / sub / "config.json").is_file():
            raise MissingFile(f"world_model.svd_path={root}: no {sub}/config.json; download "
                              f"{SVD_URL} (e.g. `huggingface-cli download "
                              f"stabilityai/stable-video-diffusion-img2vid --local-dir DIR`)")
    unet = _stock_unet_class().from_pretrained(root, subfolder="unet")
    model.unet.load_state_dict(unet.state_dict(), strict=True)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(root, subfolder="vae")
    model.vae.load_state_dict(vae.state_dict(), strict=True)
