"""Autoregressive rollouts: generated chunks are appended to the history buffer (METHOD.md §1).

Pure functions with the randomness passed in: the noise of chunk c of sample b comes from
``derive_seed(seed_b, c)``, so any rollout — and any branched candidate — is reproducible from
its seed alone, whatever else shares its batch.
"""
from __future__ import annotations

import torch

from persistworld.utils.seeding import derive_seed, seeded_normal
from persistworld.world_model.interface import HistoryBuffer, WorldModel


def chunk_noise(model: WorldModel, seeds: list[int], chunk: int) -> torch.Tensor:
    """(B, noise_frames, C, Hs, Ws) standard normal noise for chunk ``chunk`` of each sample."""
    shape = (model.noise_frames, *model.latent_shape())
    return seeded_normal(shape, [derive_seed(s, chunk) for s in seeds])


@torch.no_grad()
def rollout(model: WorldModel, buffer: HistoryBuffer, actions: torch.Tensor, num_chunks: int,
            seeds: list[int], num_steps: int | None = None, first_chunk: int = 0,
            teacher_latents: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, HistoryBuffer]:
    """Roll out ``num_chunks`` chunks from ``buffer``.

    actions: (B, num_chunks * L, A) poses of the frames to generate.
    teacher_latents: (B, num_chunks * L, C, Hs, Ws) ground truth; when given, the history is
        fed ground truth after each chunk instead of the model's output (teacher-forced
        evaluation: isolates one-chunk error from compounding error).
    first_chunk: index of the first chunk in the sample's chunk sequence (seeds its noise).
    Returns generated latents (B, num_chunks * L, C, Hs, Ws) and the final buffer.
    """
    L = model.future
    if actions.shape[1] < num_chunks * L:
        raise ValueError(f"rollout needs {num_chunks * L} actions, got {actions.shape[1]}")
    device = buffer.latents.device
    out = []
    for c in range(num_chunks):
        acts = actions[:, c * L:(c + 1) * L]
        noise = chunk_noise(model, seeds, first_chunk + c).to(device)
        x = model.sample_chunk(buffer, acts, noise=noise, num_steps=num_steps)   # (B, L, C, Hs, Ws)
        out.append(x)
        fed = x if teacher_latents is None else teacher_latents[:, c * L:(c + 1) * L]
        buffer = buffer.push(fed, acts)
    return torch.cat(out, 1), buffer
