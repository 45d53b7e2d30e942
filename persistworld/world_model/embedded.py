"""The embedded world model: Ctrl-World's structure at a size that trains on a CPU.

Working space ("latents"): pixels, losslessly rearranged; no learned autoencoder.

    pixels (B, T, V, 3, h, w) in [0, 1]
      -> (p - pixel_mean) / pixel_std          mini-DROID: mean 0.38, std 0.166 -> std ~1
                                               (EDM sigma_data = 1, as for SVD's scaled latents)
      -> views stacked along height            (B, T, 3, V*h, w), as Ctrl-World does
      -> space-to-depth by ``patch``           (B, T, C = 3*patch^2, Hs = V*h/patch, Ws = w/patch)

With the defaults (64 x 64 views, patch 4) a frame latent is (48, 48, 16): rows 0-15 are ext1,
16-31 ext2, 32-47 wrist. ``decode`` inverts this exactly (no clamping; callers clamp).

Why this space (measured on the 2-core development machine while shared, so pessimistic;
FLOPs from ``torch.utils.flop_counter``): raw pixels (patch 1, a 192 x 64 grid) cost 8 GFLOP
and ~2.8 s per denoiser call even with a (32, 64, 64) UNet; patch 2 costs 2.6-3 GFLOP for a
4-level UNet; patch 4 with the default UNet costs 1.6 GFLOP, ~50-70 ms per call at batch 1.
A learned autoencoder to 16 x 16 x C per view would hand the UNet the same 48 x 16 grid, hence
the same cost, while adding a trained stage and a reconstruction error floor.

The denoiser ("frames in channels", as Ctrl-World's SVD UNet concatenates its condition frame
on channels):

    UNet input  = [c_in * x_sigma (L*C ch) | history latents (H*C ch)]    (B, (L+H)*C, Hs, Ws)
    timestep    = noise_cond_scale * c_noise(sigma)                        (B,)
    cross-attn  = ActionEncoder(history poses ++ future targets)           (B, H+L, d)
    features    = UNet output                                              (B, D, Hs, Ws)
    F           = FrameHead(features, c_in * x_sigma, h_last, frame tokens, c_noise)
                  + LinearSkip(c_in * x_sigma, h_last, c_noise)             (B, L, C, Hs, Ws)

and x0_hat = h_last + c_skip * (x_sigma - h_last) + c_out * F (``edm.precondition`` around the
``x0_anchor``; ``x0_anchor: none`` is METHOD.md §1 exactly). ``FrameHead`` (``frame_head: 0``
turns it off: the UNet then writes all L*C channels) and the training noise levels
ln sigma ~ N(-1.2, 1.2^2) were chosen by the ablation in models/README.md.
``LinearSkip`` (a sigma-conditioned per-channel linear path, part of F) was added after
measuring: without it the 64-channel first UNet level cannot carry the 240-channel per-pixel
part of F's target, the denoiser under-removes noise at mid sigma, and 50-step samples came out
~6 dB below the one-step posterior mean (sampled one-chunk PSNR 14.3 dB at 300 steps vs 18.4 dB
with it; "repeat the last frame" 20.6 dB on the same clips). The backbone is a small
diffusers ``UNet2DConditionModel``, so peft LoRA targets the same attention module names
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) as the SVD UNet of a real Ctrl-World backend.

Action conditioning that is used (models/README.md): no model trained with pose tokens alone,
pose maps or silhouette maps changed its chunk when given another sample's poses. With
``silhouettes`` a small decoder (``Silhouettes``, trained on the rendered class masks beside
the denoising loss) draws each frame's robot from its pose, and ``x0_anchor: composite`` makes
the preconditioning's origin, per future frame, the last frame with the robot moved there
(``Silhouettes.composite``): x0_hat = a_l + c_skip (x - a_l) + c_out F(c_in (x - a_l)), and the
FrameHead / LinearSkip copy from a_l instead of h_last. The prediction then follows the
actions by construction, and the network learns the detail around it. ``output_gate`` (the
shipped model's third stage) multiplies that residual per frame and latent cell by a gate g
from the FrameHead, x0_hat = a_l + g (c_skip (x - a_l) + c_out F): where nothing changes the
anchor is copied exactly, so the sampler's noise no longer turns into grain there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as nnf
from torch import nn

from persistworld.world_model import edm
from persistworld.world_model.interface import VIEWS, HistoryBuffer, WorldModel
from persistworld.errors import UserError

X0_ANCHORS = ("none", "last_frame", "composite")
SAMPLER_STARTS = ("noise", "anchor")
_UP_BLOCK = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


@dataclass
class EmbeddedConfig:
    """Settings of the embedded world model (``conf/world_model/embedded.yaml``)."""

    name: str = "embedded"
    # chunk layout
    history: int = 6                    # H frames in the history buffer
    future: int = 5                     # L frames generated per chunk
    views: int = len(VIEWS)             # V, stacked along height
    image_height: int = 64              # pixels per view
    image_width: int = 64
    action_dim: int = 7                 # A
    # working space
    patch: int = 4                      # space-to-depth factor (1 = raw pixels)
    pixel_mean: float = 0.4             # (p - pixel_mean) / pixel_std, p in [0, 1]: mini-DROID
    pixel_std: float = 0.17             #   pixels have mean 0.38, std 0.166 -> latent std ~1
    # action encoder: per-frame MLP A -> d -> d, one cross-attention token per frame
    action_hidden: int = 128            # d (Ctrl-World: 1024)
    # UNet2DConditionModel backbone
    block_out_channels: list[int] = field(default_factory=lambda: [64, 96, 128])
    down_block_types: list[str] = field(default_factory=lambda: [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    layers_per_block: int = 1
    conv_in_kernel: int = 1             # 1 = a linear embedding of each patch (cheap: the input
    conv_out_kernel: int = 3            #   has (H+L)*C channels); 3 = diffusers' default
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    # EDM noise levels
    p_mean: float = -1.2                # training: ln sigma ~ N(p_mean, p_std^2); EDM's pixel-
    p_std: float = 1.2                  #   space values (Ctrl-World's: edm.P_MEAN, edm.P_STD)
    sigma_data: float = 1.0             # EDM's data std in the preconditioning (1 = Ctrl-World)
    sigma_min: float = 0.002            # sampler (Karras schedule, Euler, + final 0)
    sigma_max: float = 80.0
    rho: float = 7.0
    num_steps: int = 50                 # sampler steps per chunk (paper: 50)
    sampler: str = "euler"              # euler | heun (EDM's 2nd order: 2N - 1 calls)
    sampler_start: str = "noise"        # noise: x_T = sigma_max eps (EDM) | anchor: x_T =
                                        #   anchor + sigma_max eps (the prior around x0_anchor)
    history_noise: float = 0.0          # training-only noise sigma added to history latents
    noise_cond_scale: float = 1.0       # the UNet timestep is noise_cond_scale * c_noise(sigma)
    x0_anchor: str = "last_frame"       # none | last_frame | composite: the origin of x0_hat
    linear_skip: bool = True            # add LinearSkip to the network F (see its docstring)
    frame_head: int = 128               # >0: FrameHead of this width maps the UNet's features to
                                        #   each future frame's output (0 = the UNet outputs L*C)
    unet_out_channels: int = 64         # feature channels the UNet hands the FrameHead
    action_maps: bool = False           # also feed every frame's pose as constant input maps
                                        #   ((H+L)*A channels) plus 2 coordinate maps, so the
                                        #   convolutions see pose and position together
    pose_maps: bool = False             # also feed every frame's end-effector position drawn
                                        #   into each camera as a Gaussian blob (H+L channels;
                                        #   the FrameHead gets frame l's and the last history
                                        #   frame's): conditioning that is already spatial
    pose_map_cameras: list = field(default_factory=list)  # per view: 16 floats (projection @
                                        #   view, row-major, world -> clip) or [] (no blob);
                                        #   train-base fills them from the dataset
    pose_map_range: list = field(default_factory=list)    # [[x, y, z, rx, ry, rz] at pose -1,
                                        #   the same at +1]: undoes the pose normalisation
                                        #   (train-base fills it)
    pose_map_wrist: dict = field(default_factory=dict)    # {} or the camera that moves with
                                        #   the hand: view, proj, eye / target / up in the
                                        #   grasp frame, r_down, table landmarks it draws
                                        #   (scene.wrist_camera_rig; train-base fills it)
    pose_map_width: float = 3.0         # blob std in pixels
    silhouettes: bool = False           # also feed every frame's robot silhouette in every view,
                                        #   as a learned decoder (``Silhouettes``, trained on
                                        #   the rendered masks beside the denoising loss)
                                        #   draws it from the pose: input maps + FrameHead
    silhouette_hidden: int = 256        # width of that decoder's pose MLP
    output_gate: bool = False           # x0_hat = anchor + g * (the preconditioned residual),
                                        #   g = sigmoid of a per-frame, per-cell FrameHead
                                        #   output: where g -> 0 the anchor is copied exactly,
                                        #   noise or not (``OutputGate``)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "EmbeddedConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UserError(f"unknown world_model settings {unknown}; known: {sorted(known)}")
        out = cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()})
        out.validate()
        return out

    def validate(self) -> None:
        p = self.patch
        if self.image_height % p or self.image_width % p:
            raise UserError(f"world_model.patch={p} must divide the image size "
                            f"{self.image_height}x{self.image_width}")
        if len(self.block_out_channels) != len(self.down_block_types):
            raise UserError("world_model.block_out_channels and world_model.down_block_types "
                            "must have the same length")
        bad = [b for b in self.down_block_types if b not in _UP_BLOCK]
        if bad:
            raise UserError(f"world_model.down_block_types: unsupported {bad}; use "
                            f"{sorted(_UP_BLOCK)}")
        levels = len(self.block_out_channels) - 1
        hs, ws = self.views * self.image_height // p, self.image_width // p
        if hs % 2 ** levels or ws % 2 ** levels:
            raise UserError(f"the {hs}x{ws} latent grid must be divisible by 2^{levels} for "
                            f"{levels + 1} UNet levels: lower world_model.patch or use fewer "
                            f"levels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise UserError(f"world_model.norm_num_groups={self.norm_num_groups} must divide "
                            f"every block_out_channels {self.block_out_channels}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise UserError("need 0 < world_model.sigma_min < world_model.sigma_max")
        if self.x0_anchor not in X0_ANCHORS:
            raise UserError(f"world_model.x0_anchor must be one of {X0_ANCHORS}, got "
                            f"{self.x0_anchor!r}")
        if self.sampler_start not in SAMPLER_STARTS:
            raise UserError(f"world_model.sampler_start must be one of {SAMPLER_STARTS}, got "
                            f"{self.sampler_start!r}")
        if self.sampler not in edm.SAMPLERS:
            raise UserError(f"world_model.sampler must be one of {sorted(edm.SAMPLERS)}, got "
                            f"{self.sampler!r}")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise UserError("world_model.conv_in_kernel / conv_out_kernel must be odd")
        if self.frame_head < 0 or self.unet_out_channels < 1:
            raise UserError("need world_model.frame_head >= 0 and world_model.unet_out_channels "
                            ">= 1")
        if self.sigma_data <= 0:
            raise UserError(f"world_model.sigma_data must be > 0, got {self.sigma_data}")
        if self.pixel_std <= 0 or self.history_noise < 0:
            raise UserError("need world_model.pixel_std > 0 and world_model.history_noise >= 0")
        if self.x0_anchor == "composite" and not self.silhouettes:
            raise UserError("world_model.x0_anchor=composite paints the decoded robot "
                            "silhouettes into the last frame: set world_model.silhouettes=true")
        if self.output_gate and (not self.frame_head or self.x0_anchor == "none"):
            raise UserError("world_model.output_gate=true gates the residual around the "
                            "x0_anchor per frame in the FrameHead: it needs "
                            "world_model.frame_head > 0 and world_model.x0_anchor "
                            "last_frame or composite")
        if self.silhouettes and self.silhouette_hidden < 1:
            raise UserError(f"world_model.silhouette_hidden must be >= 1, got "
                            f"{self.silhouette_hidden}")
        if self.pose_maps:
            cams, rng = self.pose_map_cameras, self.pose_map_range
            if not cams and not rng:
                return          # train-base fills both from the dataset before building
            wrist = self.pose_map_wrist
            if len(cams) != self.views or any(len(c) not in (0, 16) for c in cams) \
                    or not (any(cams) or wrist):
                raise UserError(f"world_model.pose_maps=true needs world_model.pose_map_cameras: "
                                f"{self.views} entries of 16 numbers (or [] for a view without "
                                f"a blob), got {cams!r}; `persistworld train-base` fills them "
                                f"from the dataset")
            dims = 6 if wrist else 3                 # the hand camera needs the rotation
            if len(rng) != 2 or any(len(r) not in (dims, 6) for r in rng) \
                    or len(rng[0]) != len(rng[1]):
                raise UserError(f"world_model.pose_maps=true needs world_model.pose_map_range "
                                f"[[x, y, z, rx, ry, rz] at -1, [...] at +1], got {rng!r}; "
                                f"`persistworld train-base` fills it from the dataset")
            need = {"view", "proj", "eye", "target", "up", "r_down", "landmarks"}
            if wrist and (set(wrist) != need or not 0 <= int(wrist["view"]) < self.views
                          or cams[int(wrist["view"])]):
                raise UserError(f"world_model.pose_map_wrist: expected the keys {sorted(need)} "
                                f"and a view without a fixed camera, got {wrist!r}")
            if self.pose_map_width <= 0:
                raise UserError(f"world_model.pose_map_width must be > 0, got "
                                f"{self.pose_map_width}")

    @property
    def channels(self) -> int:
        """C: channels of one frame latent."""
        return 3 * self.patch ** 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, Hs, Ws) of one frame latent."""
        return (self.channels, self.views * self.image_height // self.patch,
                self.image_width // self.patch)


class ActionEncoder(nn.Module):
    """Per-frame pose MLP (A -> d -> d) + a learned frame-position embedding.

    (B, H+L, A) poses, history first -> (B, H+L, d): one cross-attention token per frame
    (Ctrl-World: 7 -> 1024 -> 1024 -> 1024)."""

    def __init__(self, action_dim: int, hidden: int, num_frames: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(action_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))
        self.frame_embedding = nn.Parameter(torch.randn(num_frames, hidden) * 0.02)

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        return self.mlp(actions) + self.frame_embedding          # (B, H+L, d)


class LinearSkip(nn.Module):
    """A sigma-conditioned per-channel linear path around the UNet:
    a(sigma) * c_in x_sigma + b(sigma) * h_last, (B, L, C, Hs, Ws).

    The network target F* = (x0 - c_skip x_sigma) / c_out is, at mid noise levels, mostly a
    per-pixel combination of x_sigma and x0 ~ h_last (the newest history latent). Through the
    UNet that signal has L*C = 240 channels per position against a 64-channel first level, so
    it cannot pass and samples keep residual noise; this path carries it directly and leaves
    the UNet the motion. Zero-initialised (starts as the plain UNet)."""

    def __init__(self, future: int, channels: int, hidden: int = 64):
        super().__init__()
        self.future, self.channels = future, channels
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2 * future * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x_in: torch.Tensor, h_last: torch.Tensor,
                noise_cond: torch.Tensor) -> torch.Tensor:
        ab = self.mlp(noise_cond.reshape(-1, 1))                          # (B, 2*L*C)
        a, b = ab.reshape(-1, 2, self.future, self.channels, 1, 1).unbind(1)  # (B, L, C, 1, 1)
        return a * x_in + b * h_last


class FrameHead(nn.Module):
    """Per-frame output head: the UNet's shared features -> each future frame's part of F.

    With the UNet writing all L*C = 240 output channels of a position from its 64-channel last
    level, five frames of per-pixel detail must squeeze through 64 numbers, and one-step
    denoising at low sigma is worse than returning the input (measured on the shipped model).
    Here the UNet hands over D feature channels (the motion, shared by the L frames) and a
    small 1x1-conv network, shared over frames, writes each frame l from
    [features | c_in x_sigma of frame l | newest history latent] plus a per-frame bias from that
    frame's action token and the noise level: every frame gets its own C channels at full
    latent resolution, at ~0.1 GFLOP per call.

        feats (B, D, Hs, Ws), x_in (B, L, C, Hs, Ws), h_last (B, 1, C, Hs, Ws),
        tokens (B, L, d), noise_cond (B,) -> (B, L, C, Hs, Ws)"""

    def __init__(self, features: int, channels: int, future: int, token_dim: int, hidden: int,
                 maps: int = 0, gate: bool = False):
        super().__init__()
        self.future = future
        self.inp = nn.Conv2d(features + 2 * channels + maps, hidden, 1)
        self.cond = nn.Linear(token_dim + 1, 2 * hidden)      # per-frame scale and shift
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 1)
        self.norm = nn.GroupNorm(min(32, hidden), hidden)
        self.gate = OutputGate(hidden) if gate else None

    def forward(self, feats: torch.Tensor, x_in: torch.Tensor, h_last: torch.Tensor,
                tokens: torch.Tensor, noise_cond: torch.Tensor,
                maps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``maps``: (B, L, k, Hs, Ws) per-frame spatial conditioning (``pose_maps``) or None.
        Returns (F (B, L, C, Hs, Ws), the ``OutputGate`` (B, L, 1, Hs, Ws) or None)."""
        B, L, C, Hs, Ws = x_in.shape
        f = feats.unsqueeze(1).expand(B, L, *feats.shape[1:])
        h = h_last.expand(B, L, C, Hs, Ws)
        parts = [f, x_in, h] + ([maps] if maps is not None else [])
        z = self.inp(torch.cat(parts, 2).reshape(B * L, -1, Hs, Ws))   # (B*L, hid, ..)
        cond = torch.cat([tokens, noise_cond.reshape(B, 1, 1).expand(B, L, 1)], 2)
        scale, shift = self.cond(cond).reshape(B * L, 2, -1, 1, 1).unbind(1)
        z = nnf.silu(self.norm(z) * (1 + scale) + shift)
        z = nnf.silu(self.mid(z))
        gate = None if self.gate is None else self.gate(z).reshape(B, L, 1, Hs, Ws)
        return self.out(z).reshape(B, L, C, Hs, Ws), gate


class OutputGate(nn.Module):
    """``output_gate``: how much of the denoiser's residual around the anchor each latent cell
    of each future frame keeps, g in (0, 1) from the FrameHead's per-frame features:

        x0_hat = a_l + g * (c_skip (x - a_l) + c_out F(c_in (x - a_l)))

    A compositing mask in the manner of CDNA (Finn et al. 2016): the static background is the
    anchor itself (g -> 0) whatever the noise, and the network draws only where the scene
    changes. Without it the residual of every cell carries some sampler noise: on the test
    starts the composite anchor alone scores one-chunk external SSIM 0.813 against 0.713 for
    the sampled chunk of the same model, and 0.792 for "repeat the last frame"
    (models/README.md). The logit starts at ``init`` (g = 0.88) with zero weights, so a model
    grown from one without the gate starts close to it. The logit is ``gain`` times a 1x1
    convolution: Adam moves every parameter by about the learning rate per step, and at
    3e-4 x 800 steps a plain logit moved by less than 0.3 (the gate stayed near 0.85
    everywhere); the gain lets a gate that starts fresh under ``trainer.init_from`` open
    and close within a fine-tuning run."""

    gain = 30.0           # part of what saved gate weights mean: a file does not record it

    def __init__(self, hidden: int, init: float = 2.0):
        super().__init__()
        self.conv = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, init / self.gain)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, hidden, Hs, Ws) -> (N, 1, Hs, Ws) in (0, 1)."""
        return torch.sigmoid(self.gain * self.conv(z))


def action_map_channels(cfg: EmbeddedConfig) -> int:
    """Extra UNet input channels of ``action_maps``: (H+L)*A pose maps + 2 coordinate maps."""
    return (cfg.history + cfg.future) * cfg.action_dim + 2 if cfg.action_maps else 0


def action_maps(actions: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
    """(B, T, A) poses -> (B, T*A + 2, hs, ws): each pose value as a constant map, then the
    row and column coordinates in [-1, 1] (where a pose puts the arm depends on the pixel)."""
    B = actions.shape[0]
    poses = actions.reshape(B, -1, 1, 1).expand(B, actions.shape[1] * actions.shape[2], hs, ws)
    rows = torch.linspace(-1, 1, hs, device=actions.device, dtype=actions.dtype)
    cols = torch.linspace(-1, 1, ws, device=actions.device, dtype=actions.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))[None].expand(B, 2, hs, ws)
    return torch.cat([poses, grid], 1)


class PoseMaps(nn.Module):
    """Each frame's end-effector position drawn into every camera that has a matrix:

        normalised poses (B, T, A) -> world xyz (undo ``pose_map_range``) -> clip coordinates
        (projection @ view) -> pixel (column, row) -> Gaussian blob of std ``pose_map_width``
        pixels, evaluated at the latent cells' centres -> (B, T, Hs, Ws), views along height

    as the working space stacks them. The wrist camera moves with the hand, so it has no fixed
    matrix: with ``pose_map_wrist`` the pose places that camera and it draws fixed table-top
    landmarks (their motion is the camera's); a view with neither stays 0, and so does a point
    behind a camera. The network then sees where the arm will be in each image instead of
    having to learn the projection of a 7-D pose; no parameters (the matrices are buffers
    outside the state dict, set from the config)."""

    def __init__(self, cfg: EmbeddedConfig):
        super().__init__()
        if not cfg.pose_map_cameras:
            raise UserError("world_model.pose_maps=true but world_model.pose_map_cameras is "
                            "empty: `persistworld train-base` fills it (and pose_map_range) "
                            "from the dataset; elsewhere give both explicitly "
                            "(EpisodeStore(root).pose_map_geometry())")
        self.h, self.w, self.patch = cfg.image_height, cfg.image_width, cfg.patch
        self.width = float(cfg.pose_map_width)
        cams = [c if len(c) else [0.0] * 16 for c in cfg.pose_map_cameras]
        self.register_buffer("cameras", torch.tensor(cams, dtype=torch.float32).reshape(
            -1, 4, 4), persistent=False)                                   # (V, 4, 4)
        self.register_buffer("has_camera", torch.tensor(
            [bool(len(c)) for c in cfg.pose_map_cameras]), persistent=False)
        lo, hi = cfg.pose_map_range
        self.register_buffer("lo", torch.tensor(lo, dtype=torch.float32), persistent=False)
        self.register_buffer("hi", torch.tensor(hi, dtype=torch.float32), persistent=False)
        rig = cfg.pose_map_wrist
        self.wrist_view = int(rig["view"]) if rig else None
        for key in ("proj", "eye", "target", "up", "r_down", "landmarks"):
            value = torch.tensor(rig[key], dtype=torch.float32) if rig else torch.zeros(0)
            self.register_buffer(f"wrist_{key}", value, persistent=False)

    def world(self, poses: torch.Tensor) -> torch.Tensor:
        """Normalised poses (..., A) -> world position and rotation vector (..., 6) (or the
        position alone (..., 3) for a range without rotations)."""
        n = poses[..., :self.lo.shape[0]].float()
        return self.lo + (n + 1) / 2 * (self.hi - self.lo)

    def _uv(self, clip: torch.Tensor, ok: torch.Tensor):
        wc = clip[..., 3]
        visible = (wc > 1e-6) & ok
        ndc = clip[..., :2] / torch.where(visible, wc, torch.ones_like(wc)).unsqueeze(-1)
        uv = torch.stack([(ndc[..., 0] + 1) / 2 * self.w, (1 - ndc[..., 1]) / 2 * self.h], -1)
        return uv, visible

    def pixels(self, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, A) -> the end effector's pixel (column, row) in every fixed camera
        (B, T, V, 2) and its visibility (B, T, V)."""
        xyz = self.world(poses)[..., :3]
        hom = torch.cat([xyz, torch.ones_like(xyz[..., :1])], -1)                  # (B, T, 4)
        clip = torch.einsum("vij,btj->btvi", self.cameras, hom)                    # (B, T, V, 4)
        return self._uv(clip, self.has_camera)

    def wrist_pixels(self, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, A) -> the table landmarks' pixels in the hand camera (B, T, K, 2), visible
        (B, T, K): that camera moves with the pose, so the landmarks show its ego-motion."""
        w = self.world(poses)
        R = rotvec_matrix(w[..., 3:]) @ self.wrist_r_down.reshape(3, 3)             # (B, T, 3, 3)
        pos = w[..., :3]
        view = look_at(pos + R @ self.wrist_eye, pos + R @ self.wrist_target,
                       R @ self.wrist_up)                                          # (B, T, 4, 4)
        pv = self.wrist_proj.reshape(4, 4) @ view
        lm = self.wrist_landmarks
        hom = torch.cat([lm, torch.ones_like(lm[:, :1])], -1)                      # (K, 4)
        clip = torch.einsum("btij,kj->btki", pv, hom)                               # (B, T, K, 4)
        return self._uv(clip, torch.ones((), dtype=torch.bool, device=poses.device))

    def _blobs(self, uv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(..., 2) pixels -> (..., hs, Ws) Gaussian blobs at the latent cells' centres."""
        P = self.patch
        cols = (torch.arange(self.w // P, device=uv.device) + 0.5) * P             # (Ws,)
        rows = (torch.arange(self.h // P, device=uv.device) + 0.5) * P             # (hs,)
        du = (cols - uv[..., :1]) ** 2                                            # (..., Ws)
        dv = (rows - uv[..., 1:]) ** 2                                            # (..., hs)
        blob = torch.exp(-(dv.unsqueeze(-1) + du.unsqueeze(-2)) / (2 * self.width ** 2))
        return blob * visible[..., None, None]

    def forward(self, poses: torch.Tensor) -> torch.Tensor:
        blob = self._blobs(*self.pixels(poses))                            # (B, T, V, hs, Ws)
        if self.wrist_view is not None:
            lm = self._blobs(*self.wrist_pixels(poses)).amax(2)            # (B, T, hs, Ws)
            blob = torch.cat([blob[:, :, :self.wrist_view], lm.unsqueeze(2),
                              blob[:, :, self.wrist_view + 1:]], 2)
        B, T, V, hs, Ws = blob.shape
        return blob.reshape(B, T, V * hs, Ws).to(poses.dtype)


class Silhouettes(nn.Module):
    """The robot's silhouette in every view, drawn from the pose by a small learned decoder:

        normalised pose (..., A) -> MLP -> (128, 4, 4) -> upsample + conv twice -> one logit
        per latent cell and view (..., V, h/patch, w/patch)

    trained on the rendered class masks (the fraction of each cell the robot covers;
    ``loss``, beside the denoising loss) and fed, as probabilities, to the denoiser as one map
    per frame laid out like the latent grid (views along height). The arm's place in every
    camera is then an input the UNet can copy from, not something it must derive from a 7-D
    token (which the models trained without it never did: models/README.md). A probe on the
    default data learned it to a validation IoU of 0.86 (external) in 500 steps of 128 poses
    on one CPU thread. The external cameras move only by the per-episode jitter (1 cm) and the
    hand camera sees its own fingers, so a pose fixes the silhouette in all three views."""

    def __init__(self, cfg: EmbeddedConfig):
        super().__init__()
        d = int(cfg.silhouette_hidden)
        self.views, self.patch = cfg.views, cfg.patch
        self.hs, self.ws = cfg.image_height // cfg.patch, cfg.image_width // cfg.patch
        self.mlp = nn.Sequential(nn.Linear(cfg.action_dim, d), nn.SiLU(), nn.Linear(d, d),
                                 nn.SiLU(), nn.Linear(d, 128 * 16))
        self.conv1 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, 3, padding=1)
        self.out = nn.Conv2d(32, cfg.views, 3, padding=1)
        # the robot's mean colour per view (pixels in [0, 1]), fitted on its pixels
        self.colour = nn.Parameter(torch.full((cfg.views, 3), 0.5))

    def logits(self, poses: torch.Tensor) -> torch.Tensor:
        """(..., A) -> (..., V, hs, ws)."""
        lead = poses.shape[:-1]
        z = self.mlp(poses.reshape(-1, poses.shape[-1]).float()).reshape(-1, 128, 4, 4)
        z = nnf.silu(self.conv1(nnf.interpolate(z, size=(max(self.hs // 2, 1),
                                                         max(self.ws // 2, 1)))))
        z = nnf.silu(self.conv2(nnf.interpolate(z, size=(self.hs, self.ws))))
        return self.out(z).reshape(*lead, self.views, self.hs, self.ws)

    def forward(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, T, A) -> (B, T, V*hs, ws) probabilities, views along height (no gradient: the
        decoder learns from the masks only)."""
        with torch.no_grad():
            return self.layout(torch.sigmoid(self.logits(poses))).to(poses.dtype)

    def layout(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, T, V, hs, ws) -> (B, T, V*hs, ws): views along height, as the latent grid."""
        B, T = cells.shape[:2]
        return cells.reshape(B, T, self.views * self.hs, self.ws)

    def target(self, masks: torch.Tensor) -> torch.Tensor:
        """Class masks (..., V, h, w) (1 = robot) -> the robot's share of every cell."""
        robot = (masks == 1).to(torch.float32)
        lead = robot.shape[:-2]
        cells = nnf.avg_pool2d(robot.reshape(-1, 1, *robot.shape[-2:]), self.patch)
        return cells.reshape(*lead, self.hs, self.ws)

    def loss(self, poses: torch.Tensor, masks: torch.Tensor,
             frames: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss (N,): BCE of the decoded silhouettes of poses (N, T, A) against the
        class masks (N, T, V, h, w) of the same frames, plus (with their pixels (N, T, V, 3, h,
        w)) the squared error of ``colour`` on the robot's pixels."""
        err = nnf.binary_cross_entropy_with_logits(self.logits(poses), self.target(masks),
                                                   reduction="none").flatten(1).mean(1)
        if frames is None:
            return err
        robot = (masks == 1).unsqueeze(3).to(frames.dtype)                 # (N, T, V, 1, h, w)
        diff = (frames - self.colour[:, :, None, None]).pow(2) * robot
        return err + diff.flatten(1).sum(1) / (3 * robot.flatten(1).sum(1)).clamp_min(1)

    @torch.no_grad()
    def composite(self, last: torch.Tensor, poses: torch.Tensor,
                  logits: torch.Tensor | None = None) -> torch.Tensor:
        """``x0_anchor: composite``: the last frame's pixels (B, V, 3, h, w) with the robot
        moved to each future pose (B, 1 + L, A) (the last frame's pose first) -> (B, L, V, 3,
        h, w). Per latent cell, with the decoded silhouettes thresholded at 1/2: where the
        robot arrives, its fitted colour; where it leaves, the view's mean colour outside the
        robot (the background behind it is unknown); elsewhere, the robot's own pixels
        included, the last frame. No learned image content: the denoiser adds the detail.
        (Soft silhouettes, or painting the whole silhouette, lose 1.5-3.5 dB to "repeat the
        last frame" mid-episode: models/README.md.) ``logits``: ``self.logits(poses)`` if
        already at hand."""
        robot = (self.logits(poses) if logits is None else logits) > 0   # (B, 1+L, V, hs, ws)
        B, T, V = robot.shape[:3]
        cells = nnf.interpolate(robot.reshape(B * T * V, 1, self.hs, self.ws).to(last.dtype),
                                scale_factor=self.patch, mode="nearest")
        cells = cells.reshape(B, T, V, 1, *cells.shape[-2:])
        was, will = cells[:, :1], cells[:, 1:]                           # (B, 1|L, V, 1, h, w)
        arrive, leave = will * (1 - was), was * (1 - will)
        outside = 1 - was[:, 0]                                           # (B, V, 1, h, w)
        bg = (last * outside).sum((-2, -1), keepdim=True) / outside.sum(
            (-2, -1), keepdim=True).clamp_min(1)
        colour = self.colour.to(last.dtype)[None, None, :, :, None, None]
        return (arrive * colour + leave * bg.unsqueeze(1)
                + (1 - arrive - leave) * last.unsqueeze(1))

    @torch.no_grad()
    def iou(self, poses: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(V,) intersection over union of the cells > 1/2 covered, per view."""
        a = self.logits(poses) > 0
        b = self.target(masks) > 0.5
        dims = [i for i in range(a.dim()) if i != a.dim() - 3]
        return (a & b).sum(dims) / (a | b).sum(dims).clamp_min(1)


def rotvec_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues)."""
    theta = v.norm(dim=-1, keepdim=True).unsqueeze(-1)                             # (..., 1, 1)
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*v.shape[:-1], 3, 3)
    small = theta < 1e-8
    t = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, torch.ones_like(theta), torch.sin(t) / t)
    b = torch.where(small, torch.full_like(theta, 0.5), (1 - torch.cos(t)) / t ** 2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenGL view matrices (..., 4, 4) from (..., 3) eye / target / up (scene.look_at)."""
    f = nnf.normalize(target - eye, dim=-1)
    s = nnf.normalize(torch.cross(f, up, dim=-1), dim=-1)
    u = torch.cross(s, f, dim=-1)
    rot = torch.stack([s, u, -f], -2)                                              # (..., 3, 3)
    trans = -(rot @ eye.unsqueeze(-1))                                             # (..., 3, 1)
    top = torch.cat([rot, trans], -1)                                              # (..., 3, 4)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], -2)


def build_unet(cfg: EmbeddedConfig):
    from diffusers import UNet2DConditionModel
    C = cfg.channels
    down = list(cfg.down_block_types)
    return UNet2DConditionModel(
        sample_size=None, in_channels=(cfg.future + cfg.history) * C + action_map_channels(cfg)
        + (cfg.future + cfg.history) * (cfg.pose_maps + cfg.silhouettes),
        out_channels=cfg.unet_out_channels if cfg.frame_head else cfg.future * C,
        down_block_types=down,
        up_block_types=[_UP_BLOCK[b] for b in reversed(down)],
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.action_hidden, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups, conv_in_kernel=cfg.conv_in_kernel,
        conv_out_kernel=cfg.conv_out_kernel)


class EmbeddedWorldModel(WorldModel):
    """UNet2DConditionModel + ActionEncoder with EDM x0 preconditioning (module docstring)."""

    def __init__(self, cfg: EmbeddedConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.history, self.future = cfg.history, cfg.future
        self.unet = build_unet(cfg)
        self.action_encoder = ActionEncoder(cfg.action_dim, cfg.action_hidden,
                                            cfg.history + cfg.future)
        self.skip = LinearSkip(cfg.future, cfg.channels) if cfg.linear_skip else None
        self.head = (FrameHead(cfg.unet_out_channels, cfg.channels, cfg.future,
                               cfg.action_hidden, cfg.frame_head,
                               maps=2 * (cfg.pose_maps + cfg.silhouettes),
                               gate=cfg.output_gate)
                     if cfg.frame_head else None)
        self.pose_maps = PoseMaps(cfg) if cfg.pose_maps else None
        self.silhouettes = Silhouettes(cfg) if cfg.silhouettes else None

    # -- contract helpers used by rollouts and trainers --------------------------------------
    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, Hs, Ws) of one frame latent."""
        return self.cfg.latent_shape

    def adapter_root(self) -> nn.Module:
        """The module LoRA adapters are injected into (the UNet, as for SVD)."""
        return self.unet

    def training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) ln sigma ~ N(p_mean, p_std^2) (models/README.md: EDM's pixel-space values)."""
        return edm.sample_training_sigma(n, generator, self.cfg.p_mean, self.cfg.p_std)

    def training_history_noise(self) -> float:
        return float(self.cfg.history_noise)

    def sampler_sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """(N + 1,) Karras noise levels of the Euler sampler, ending in 0."""
        c = self.cfg
        return edm.karras_sigmas(int(num_steps or c.num_steps), c.sigma_min, c.sigma_max, c.rho)

    # -- working space -----------------------------------------------------------------------
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, V, 3, h, w) pixels in [0, 1] -> (B, T, C, Hs, Ws)."""
        return self._to_grid((frames - self.cfg.pixel_mean) / self.cfg.pixel_std)

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, V, 3, h, w) -> (B, T, C, Hs, Ws): the layout of ``encode``, no scaling."""
        B, T, V, _, h, w = x.shape
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * T, 3, V * h, w)     # views along height
        x = nnf.pixel_unshuffle(x, self.cfg.patch)                      # (B*T, C, Hs, Ws)
        return x.reshape(B, T, *x.shape[1:])

    def motion_weight(self, masks: torch.Tensor, extra: float) -> torch.Tensor:
        """Training-loss weights from the future frames' class masks (B, L, V, h, w) (robot
        and object > 0): 1 + ``extra`` on the latent cells the arm or the object covers at any
        frame of the chunk, dilated by one cell (so the place it leaves counts too), the same
        for every frame -> (B, 1, C, Hs, Ws) in the latent layout of ``encode``."""
        B, L, V, h, w = masks.shape
        moving = (masks > 0).to(torch.float32).amax(1, keepdim=True)          # (B, 1, V, h, w)
        cells = self._to_grid(moving.unsqueeze(3).expand(B, 1, V, 3, h, w))
        cells = cells.amax(2, keepdim=True)                                  # (B, 1, 1, Hs, Ws)
        cells = nnf.max_pool2d(cells[:, 0], 3, stride=1, padding=1)[:, None]
        return 1.0 + extra * cells.expand(B, 1, self.cfg.channels, *cells.shape[-2:])

    def auxiliary_losses(self, poses: torch.Tensor, masks: torch.Tensor,
                         frames: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``silhouettes``: the decoder's per-sample loss (N,) on poses (N, T, A), class
        masks (N, T, V, h, w) and pixels (N, T, V, 3, h, w) of the same frames."""
        if self.silhouettes is None:
            return {}
        return {"silhouette": self.silhouettes.loss(poses, masks, frames)}

    def auxiliary_modules(self) -> list[nn.Module]:
        return [self.silhouettes] if self.silhouettes is not None else []

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, Hs, Ws) -> (B, T, V, 3, h, w) pixels (not clamped)."""
        B, T = latents.shape[:2]
        V = self.cfg.views
        x = nnf.pixel_shuffle(latents.reshape(B * T, *latents.shape[2:]), self.cfg.patch)
        h, w = x.shape[-2] // V, x.shape[-1]
        x = x.reshape(B, T, 3, V, h, w).permute(0, 1, 3, 2, 4, 5)
        return x * self.cfg.pixel_std + self.cfg.pixel_mean

    # -- the denoiser --------------------------------------------------------------------------
    def condition(self, buffer: HistoryBuffer, future_actions: torch.Tensor) -> dict:
        """What every denoiser call of one chunk shares (``sample_chunk`` computes it once per
        chunk): ``maps``, the per-frame spatial inputs [(B, H+L, Hs, Ws), ...] of ``pose_maps``
        and ``silhouettes``; ``anchor``, the origin of the preconditioning (``anchor``); and
        ``frame``, what the FrameHead and the LinearSkip copy from (the composite, else the
        newest history latent). The silhouettes are decoded once for both of their uses."""
        poses = torch.cat([buffer.actions, future_actions], 1)            # (B, H+L, A)
        maps, logits = [], None
        if self.pose_maps is not None:
            maps.append(self.pose_maps(poses))
        if self.silhouettes is not None:
            with torch.no_grad():
                logits = self.silhouettes.logits(poses)                   # (B, H+L, V, hs, ws)
            maps.append(self.silhouettes.layout(torch.sigmoid(logits)).to(poses.dtype))
        anchor = self._anchor(buffer, future_actions, logits)
        frame = anchor if self.cfg.x0_anchor == "composite" else buffer.latents[:, -1:]
        return {"maps": maps, "anchor": anchor, "frame": frame}

    def network(self, x_in: torch.Tensor, noise_cond: torch.Tensor, buffer: HistoryBuffer,
                future_actions: torch.Tensor, cond: dict | None = None, with_gate: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The raw network F: scaled noisy future (B, L, C, Hs, Ws), c_noise (B,) -> (B, L, C,
        Hs, Ws); ``cond``: ``condition(buffer, future_actions)`` if already at hand.
        ``with_gate``: (F, the ``OutputGate`` g (B, L, 1, Hs, Ws) of the same call, or None)."""
        cond = self.condition(buffer, future_actions) if cond is None else cond
        B, L, C, Hs, Ws = x_in.shape
        frame = cond["frame"]
        hist = buffer.latents.reshape(B, -1, Hs, Ws)                     # (B, H*C, Hs, Ws)
        unet_in = torch.cat([x_in.reshape(B, L * C, Hs, Ws), hist], 1)  # (B, (L+H)*C, Hs, Ws)
        poses = torch.cat([buffer.actions, future_actions], 1)            # (B, H+L, A)
        if self.cfg.action_maps:
            unet_in = torch.cat([unet_in, action_maps(poses.to(unet_in), Hs, Ws)], 1)
        head_maps = []                 # per future frame: frame l's map and the last history one's
        for maps in cond["maps"]:
            maps = maps.to(unet_in)                                       # (B, H+L, Hs, Ws)
            unet_in = torch.cat([unet_in, maps], 1)
            H = maps.shape[1] - L
            head_maps += [maps[:, H:], maps[:, H - 1:H].expand(B, L, Hs, Ws)]
        head_maps = torch.stack(head_maps, 2) if head_maps else None      # (B, L, k, Hs, Ws)
        tokens = self.action_encoder(poses)
        # the UNet's sinusoidal embedding spans periods 1 .. 10^4; c_noise = ln(sigma)/4 lies in
        # about [-1.6, 1.1], so it is stretched first (as EDM's VP nets receive 999 t)
        timestep = noise_cond * self.cfg.noise_cond_scale                  # (B,)
        out = self.unet(unet_in, timestep, encoder_hidden_states=tokens).sample
        gate = None
        if self.head is not None:
            out, gate = self.head(out, x_in, frame, tokens[:, -L:], noise_cond, head_maps)
        out = out.reshape(B, L, C, Hs, Ws)
        if self.skip is not None:
            out = out + self.skip(x_in, frame, noise_cond)
        return (out, gate) if with_gate else out

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, buffer: HistoryBuffer,
                future_actions: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """x_sigma (B, L, C, Hs, Ws), sigma (B,) -> x0_hat (B, L, C, Hs, Ws). Differentiable.
        ``cond``: ``condition(buffer, future_actions)`` if already at hand."""
        if buffer.latents.shape[1] != self.history or future_actions.shape[1] != self.future:
            raise UserError(f"expected {self.history} history and {self.future} future frames, "
                            f"got {buffer.latents.shape[1]} and {future_actions.shape[1]}")
        cond = self.condition(buffer, future_actions) if cond is None else cond
        sigma = sigma.reshape(-1).expand(x_sigma.shape[0]).to(x_sigma)
        anchor = cond["anchor"]                               # (B, 1 | L, C, Hs, Ws) or 0
        gate = None                                           # ``OutputGate`` of this call

        def F(x_in: torch.Tensor, noise_cond: torch.Tensor) -> torch.Tensor:
            nonlocal gate
            out, gate = self.network(x_in, noise_cond, buffer, future_actions, cond,
                                     with_gate=True)
            return out
        residual = edm.precondition(F, x_sigma - anchor, sigma, self.cfg.sigma_data)
        return anchor + (residual if gate is None else gate * residual)

    def anchor(self, buffer: HistoryBuffer, future_actions: torch.Tensor
               ) -> torch.Tensor | float:
        """The origin of the preconditioning. ``x0_anchor: none`` -> 0 (Ctrl-World / SVD exactly);
        ``last_frame`` -> the newest history latent (B, 1, C, Hs, Ws), i.e. the same EDM
        preconditioning applied to the residual x - h_last: an untrained network then predicts
        "repeat the last frame" at high noise and only has to learn the motion;
        ``composite`` -> per future frame (B, L, C, Hs, Ws) the newest history frame with the
        robot moved to that frame's pose (``Silhouettes.composite``): an untrained network
        then predicts the arm where the actions put it, and learns the rest."""
        return self._anchor(buffer, future_actions)

    def _anchor(self, buffer: HistoryBuffer, future_actions: torch.Tensor,
                logits: torch.Tensor | None = None) -> torch.Tensor | float:
        if self.cfg.x0_anchor == "last_frame":
            return buffer.latents[:, -1:]
        if self.cfg.x0_anchor == "composite":
            last = self.decode(buffer.latents[:, -1:])[:, 0]                # (B, V, 3, h, w)
            poses = torch.cat([buffer.actions[:, -1:], future_actions], 1)  # (B, 1 + L, A)
            H = buffer.latents.shape[1]
            return self.encode(self.silhouettes.composite(
                last, poses, None if logits is None else logits[:, H - 1:]))
        return 0.0

    @torch.no_grad()
    def sample_chunk(self, buffer: HistoryBuffer, future_actions: torch.Tensor,
                     generator: torch.Generator | None = None, num_steps: int | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C, Hs, Ws) with the configured sampler (Euler: one batched network call per
        step; Heun: two but the last)."""
        B = future_actions.shape[0]
        if noise is None:
            noise = torch.randn((B, self.future, *self.latent_shape()), generator=generator)
        device = buffer.latents.device
        noise = noise.to(device=device, dtype=buffer.latents.dtype)
        sigmas = self.sampler_sigmas(num_steps).to(device)
        cond = self.condition(buffer, future_actions)            # once per chunk
        origin = cond["anchor"] if self.cfg.sampler_start == "anchor" else 0.0
        return edm.SAMPLERS[self.cfg.sampler](
            lambda x, s: self.denoise(x, s, buffer, future_actions, cond), noise, sigmas, origin)
