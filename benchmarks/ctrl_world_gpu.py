"""Full-size Ctrl-World on one GPU: seconds and peak memory per chunk, and one LoRA update.

    python benchmarks/ctrl_world_gpu.py [--steps 50] [--dtype bf16] [--group 16] [--out FILE]
    python benchmarks/ctrl_world_gpu.py --tiny          # the same code path on a CPU, in seconds

Builds ``world_model=ctrl_world`` from its config (SVD's UNet + temporal VAE + the pose encoder,
RANDOM weights: cost does not depend on the values), then measures

1. one chunk (4 new frames + the re-predicted current one, 3 views of 192 x 320) at ``--steps``
   Euler steps under ``--dtype`` autocast, batch 1: seconds (mean of 2 after a warm-up), peak
   GPU memory; the published figure is about 5 s per chunk on an H100 (CTRL_WORLD.md);
2. decoding that chunk (temporal VAE, per view, chunks of 7 frames);
3. the update of one post-training step: LoRA (rank 64, the attention projections of the
   spatial and temporal blocks) on ``--group`` candidates, the x0 denoiser forward + backward
   with gradient checkpointing, in micro-batches of ``--micro`` (the NFT loss is a per-sample
   mean of x0 errors, so its cost is this forward + backward): seconds and peak memory.

Prints one JSON line (and writes it to ``--out``). Not part of CI (needs a GPU for the full
size); ``--tiny`` is tested.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from persistworld.world_model import build_world_model

TINY = dict(image_height=16, image_width=32, block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
            up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
            num_attention_heads=[2, 4], layers_per_block=1, cross_attention_dim=32,
            action_hidden=32, addition_time_embed_dim=8, vae_block_out_channels=[32, 32],
            vae_layers_per_block=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--group", type=int, default=16, help="K candidates in the update")
    ap.add_argument("--micro", type=int, default=2, help="candidates per backward pass")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny configuration (CPU check)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = {"name": "ctrl_world", "dtype": a.dtype, **(TINY if a.tiny else {})}
    t = time.perf_counter()
    model = build_world_model(cfg).to(device).eval()
    model.unet.enable_gradient_checkpointing()       # as trainer.gradient_checkpointing=true
    build_s = time.perf_counter() - t
    params = {n: sum(p.numel() for p in getattr(model, n).parameters())
              for n in ("unet", "vae", "action_encoder")}
    C, Hs, Ws = model.latent_shape()
    buf = model.start_buffer(torch.randn(1, C, Hs, Ws, device=device),
                             torch.zeros(1, 7, device=device))
    acts = torch.zeros(1, model.future, 7, device=device)
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dtype": a.dtype, "steps": a.steps, "params_M": {k: round(v / 1e6, 1)
                                                          for k, v in params.items()},
           "build_s": round(build_s, 1)}

    # 1. one chunk
    _reset(device)
    times = []
    for i in range(3):
        noise = torch.randn(1, model.noise_frames, C, Hs, Ws, generator=g)
        _sync(device)
        t = time.perf_counter()
        x = model.sample_chunk(buf, acts, noise=noise, num_steps=a.steps)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    out["chunk_s"] = round(sum(times) / len(times), 2)
    out["chunk_peak_GiB"] = _peak(device)

    # 2. decode it
    _reset(device)
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        model.decode(x)
    _sync(device)
    out["decode_s"] = round(time.perf_counter() - t, 2)
    out["decode_peak_GiB"] = _peak(device)

    # 3. the LoRA update on K candidates
    from persistworld.trainers.adapters import NamedAdapters
    roles = NamedAdapters(model, ("policy", "old"), rank=a.rank, alpha=a.rank,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    K = a.group
    bufk = buf.repeat_interleave(K)
    actk = acts.repeat_interleave(K, 0)
    x0 = torch.randn(K, model.future, C, Hs, Ws, device=device)
    sigma = torch.rand(K, device=device) * 2 + 0.1
    out["lora_M"] = round(sum(p.numel() for n, p in model.unet.named_parameters()
                              if "lora_" in n and ".policy" in n) / 1e6, 2)
    _reset(device)
    _sync(device)
    t = time.perf_counter()
    with roles.use("policy"):
        model.train()
        for s in range(0, K, a.micro):
            sl = slice(s, s + a.micro)
            x_sigma = x0[sl] + sigma[sl, None, None, None, None] * torch.randn_like(x0[sl])
            with torch.autocast(device_type=device.type, dtype=getattr(torch, {
                    "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[a.dtype]),
                    enabled=a.dtype != "fp32"):
                pred = model.denoise(x_sigma, sigma[sl], type(bufk)(bufk.latents[sl],
                                                                  bufk.actions[sl]), actk[sl])
            ((pred.float() - x0[sl]) ** 2).mean().backward()
    _sync(device)
    out["update_s"] = round(time.perf_counter() - t, 2)
    out["update_peak_GiB"] = _peak(device)
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
