"""The world-model contract every backend implements (``embedded.py``, ``ctrl_world.py``).

Shapes (B = batch, e.g. candidates; H = history frames; L = future frames per chunk;
V = 3 views in ``VIEWS`` order; A = 7 action dims; pixel frames are float in [0, 1]):

    pixels:   (B, T, V, 3, h, w)            what the dataset and the metrics see
    latents:  (B, T, C, Hs, Ws)             the model's working space, views laid out inside
                                            (the embedded model stacks views along height,
                                            as Ctrl-World does)
    actions:  (B, T, A)                     normalised to [-1, 1] with the dataset's p01/p99

One generation step ("chunk") maps (history latents, history actions, future actions, noise)
to L future latents. Rollouts append generated latents to a ``HistoryBuffer`` and repeat.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

VIEWS = ("ext1", "ext2", "wrist")


@dataclass
class HistoryBuffer:
    """The last H frame latents and their actions that condition the next chunk.

    latents: (B, H, C, Hs, Ws); actions: (B, H, A); context: (B, D) or None, per-rollout
    conditioning that is not a frame (the task text's embedding, ``WorldModel.encode_text``),
    carried unchanged. Immutable-by-convention: ``push`` returns a new buffer, so branching
    candidates each own a private copy without extra bookkeeping.
    """

    latents: torch.Tensor
    actions: torch.Tensor
    context: torch.Tensor | None = None

    @classmethod
    def backfill(cls, latent: torch.Tensor, action: torch.Tensor, history: int,
                 context: torch.Tensor | None = None) -> "HistoryBuffer":
        """Start a rollout from ONE observed state: repeat its latent (B, C, Hs, Ws) and action
        (B, A) ``history`` times (METHOD.md §1)."""
        return cls(latent.unsqueeze(1).repeat(1, history, 1, 1, 1).contiguous(),
                   action.unsqueeze(1).repeat(1, history, 1).contiguous(), context)

    @property
    def history(self) -> int:
        return self.latents.shape[1]

    def push(self, latents: torch.Tensor, actions: torch.Tensor) -> "HistoryBuffer":
        """Append L new latents (B, L, ...) and actions (B, L, A), keep the last H."""
        h = self.history
        return HistoryBuffer(torch.cat([self.latents, latents], 1)[:, -h:].contiguous(),
                             torch.cat([self.actions, actions], 1)[:, -h:].contiguous(),
                             self.context)

    def replace(self, latents: torch.Tensor | None = None,
                actions: torch.Tensor | None = None) -> "HistoryBuffer":
        """The same buffer with other latents and / or actions (same samples)."""
        return HistoryBuffer(self.latents if latents is None else latents,
                             self.actions if actions is None else actions, self.context)

    def select(self, index) -> "HistoryBuffer":
        """The samples ``index`` (a slice, a tensor of indices or a mask) of the batch."""
        return HistoryBuffer(self.latents[index], self.actions[index],
                             None if self.context is None else self.context[index])

    def float(self) -> "HistoryBuffer":
        return HistoryBuffer(self.latents.float(), self.actions.float(),
                             None if self.context is None else self.context.float())

    def repeat_interleave(self, k: int) -> "HistoryBuffer":
        """(B, ...) -> (B*k, ...): K private copies per prefix for branching."""
        return HistoryBuffer(self.latents.repeat_interleave(k, 0),
                             self.actions.repeat_interleave(k, 0),
                             None if self.context is None else
                             self.context.repeat_interleave(k, 0))


class WorldModel(abc.ABC, torch.nn.Module):
    """Action-conditioned multi-view chunk predictor with EDM x0 preconditioning."""

    history: int  # H
    future: int   # L

    @property
    def memory(self) -> int:
        """Frames a rollout's ``HistoryBuffer`` keeps (default H: the buffer is the history).
        A backend with a sparse history memory (Ctrl-World) keeps more and gathers its H
        slots from them inside ``denoise``."""
        return self.history

    @property
    def noise_frames(self) -> int:
        """Frames of standard-normal noise one chunk's sampler draws (default L; Ctrl-World
        also generates the current frame again)."""
        return self.future

    def start_buffer(self, latent: torch.Tensor, action: torch.Tensor,
                     texts: list[str] | None = None) -> HistoryBuffer:
        """The buffer of a rollout that starts from ONE observed frame latent (B, C, Hs, Ws)
        and its pose (B, A): ``memory`` copies of it (METHOD.md §1), with the task texts'
        embedding as its context when the backend is text-conditioned."""
        context = self.encode_text(texts) if texts is not None else None
        if context is not None:
            context = context.to(latent.device)
        return HistoryBuffer.backfill(latent, action, self.memory, context)

    def encode_text(self, texts: list[str]) -> torch.Tensor | None:
        """(B, D) embedding of the B task instructions, or None: the backend ignores text
        (the default)."""
        return None

    @abc.abstractmethod
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, V, 3, h, w) pixels in [0, 1] -> (B, T, C, Hs, Ws) latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, Hs, Ws) latents -> (B, T, V, 3, h, w) pixels in [0, 1]."""

    @abc.abstractmethod
    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, buffer: HistoryBuffer,
                future_actions: torch.Tensor) -> torch.Tensor:
        """The preconditioned denoiser D: noisy future latents (B, L, C, Hs, Ws) at noise level
        sigma (B,) -> clean estimate x0_hat (B, L, C, Hs, Ws). Differentiable."""

    @abc.abstractmethod
    def sample_chunk(self, buffer: HistoryBuffer, future_actions: torch.Tensor,
                     generator: torch.Generator | None = None,
                     num_steps: int | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample L future latents (B, L, C, Hs, Ws) with the Euler sampler (no grad). The
        randomness comes only from ``noise`` (standard normal, (B, noise_frames, C, Hs, Ws); the
        sampler scales it by the first sigma) or else ``generator``, so a chunk is reproducible
        from its seed."""

    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, Hs, Ws) of one frame latent (all views)."""

    @abc.abstractmethod
    def config_dict(self) -> dict:
        """The settings that rebuild this model (saved with its weights)."""

    @abc.abstractmethod
    def adapter_root(self) -> torch.nn.Module:
        """The module LoRA adapters are injected into (the denoising backbone)."""

    @abc.abstractmethod
    def sampler_sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        """(N + 1,) decreasing noise levels of the sampler, ending in 0."""

    def training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) training noise levels of this backend (Ctrl-World's ln sigma ~ N(0.7, 1.6^2)
        unless the backend says otherwise): what base training and the NFT loss draw."""
        from persistworld.world_model import edm
        return edm.sample_training_sigma(n, generator)

    def training_history_noise(self) -> float:
        """Scale of the training-only history noise augmentation (0 = off)."""
        return 0.0

    def auxiliary_losses(self, poses: torch.Tensor, masks: torch.Tensor,
                         frames: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses (N,) of side modules base training fits beside the denoising
        loss, from the poses (N, T, A), the rendered class masks (N, T, V, h, w) (0 background,
        1 robot, 2 object) and the pixels (N, T, V, 3, h, w) of the same frames; {} when the
        backend has none."""
        return {}

    def auxiliary_modules(self) -> list[torch.nn.Module]:
        """The side modules ``auxiliary_losses`` trains (base training gives them
        ``trainer.aux_lr_scale`` times the learning rate); [] when none."""
        return []
