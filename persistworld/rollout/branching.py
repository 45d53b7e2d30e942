"""Prefix and branching stages of PersistWorld post-training (METHOD.md §3, Algorithm 1).

S1  shared prefix: from ONE ground-truth observation, roll out P chunks with the model's own
    outputs as history (no gradient). P differs per sample, so the batched rollout advances
    only the samples whose prefix is not finished yet.
S2  branch: K private copies of the frozen prefix buffer, each rolled out F chunks; all B*K
    candidates go through the network together (one call per denoising step).

Every candidate is reproducible from (run seed, step, prefix index, candidate index): its
noise comes from ``derive_seed`` of those keys only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from persistworld.rollout.autoregressive import chunk_noise
from persistworld.utils.seeding import derive_seed
from persistworld.world_model.interface import HistoryBuffer, WorldModel


@dataclass
class Branches:
    """K candidates per prefix, kept per chunk so the update can re-noise each chunk with the
    exact history it was generated from."""

    latents: list[torch.Tensor]         # F x (B*K, L, C, Hs, Ws) generated chunks
    buffers: list[HistoryBuffer]        # F x buffer each chunk was generated from (B*K, ...)
    actions: list[torch.Tensor]         # F x (B*K, L, A)
    group_size: int                     # K

    def to_float(self) -> "Branches":
        """float32 copies (candidates sampled under bf16 autocast come out in bfloat16)."""
        if all(x.dtype == torch.float32 for x in self.latents):
            return self
        return Branches([x.float() for x in self.latents],
                        [b.float() for b in self.buffers],
                        [a.float() for a in self.actions], self.group_size)

    def clip(self) -> torch.Tensor:
        """(B*K, F*L, C, Hs, Ws): the whole candidate clip."""
        return torch.cat(self.latents, 1)


@torch.no_grad()
def rollout_prefix(model: WorldModel, start: HistoryBuffer, actions: torch.Tensor,
                   prefix_chunks: torch.Tensor, seeds: list[int],
                   num_steps: int | None = None) -> HistoryBuffer:
    """S1. start: back-filled buffers (B, ...); actions: (B, >= max(P)*L, A);
    prefix_chunks: (B,) P per sample. Returns the buffers after each sample's P chunks."""
    L = model.future
    lat, act = start.latents.clone(), start.actions.clone()
    for c in range(int(prefix_chunks.max().item()) if len(prefix_chunks) else 0):
        active = (prefix_chunks > c).nonzero().flatten()
        buf = HistoryBuffer(lat[active], act[active],
                            None if start.context is None else start.context[active])
        a = actions[active, c * L:(c + 1) * L]
        noise = chunk_noise(model, [seeds[i] for i in active.tolist()], c).to(lat.device)
        x = model.sample_chunk(buf, a, noise=noise, num_steps=num_steps)
        new = buf.push(x, a)
        lat[active], act[active] = new.latents, new.actions
    return start.replace(lat, act)


@torch.no_grad()
def branch(model: WorldModel, prefix: HistoryBuffer, actions: torch.Tensor, group_size: int,
           branch_chunks: int, seeds: list[int], num_steps: int | None = None) -> Branches:
    """S2. prefix: (B, ...) buffers; actions: (B, F*L, A) poses of the branched frames;
    seeds: B prefix seeds -> candidate k of prefix b uses derive_seed(seeds[b], k)."""
    L, K = model.future, group_size
    buffer = prefix.repeat_interleave(K)                                   # (B*K, H, ...)
    acts = actions.repeat_interleave(K, 0)                                 # (B*K, F*L, A)
    cand_seeds = [derive_seed(s, k) for s in seeds for k in range(K)]
    out = Branches([], [], [], K)
    for c in range(branch_chunks):
        a = acts[:, c * L:(c + 1) * L]
        noise = chunk_noise(model, cand_seeds, c).to(buffer.latents.device)
        x = model.sample_chunk(buffer, a, noise=noise, num_steps=num_steps)
        out.latents.append(x)
        out.buffers.append(buffer)
        out.actions.append(a)
        buffer = buffer.push(x, a)
    return out
