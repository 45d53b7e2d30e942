"""Which tensors an object holds: a walk over its attributes, for memory accounting.

``held_storages(obj)`` finds every tensor reachable from ``obj`` through attributes, modules
(parameters and buffers), optimiser state and containers, and groups them by the storage they
live in, so that views and shared parameters count once. The post-training memory benchmark
and the "one copy of every frozen tensor" test use it.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _walk(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, torch.nn.Module):         # parameters, buffers, submodules, caches
        yield from _walk(vars(obj), seen)
        return
    if isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _walk(state, seen)
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _walk(v, seen)
        return
    mod = type(obj).__module__ or ""
    if hasattr(obj, "__dict__") and mod.split(".")[0] in ("persistworld", "lpips"):
        yield from _walk(vars(obj), seen)


def held_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` (each tensor object once)."""
    return list(_walk(obj, set()))


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def held_storages(obj: Any) -> dict[tuple[str, int], int]:
    """{(device, storage address): bytes} of every distinct storage reachable from ``obj``."""
    out: dict[tuple[str, int], int] = {}
    for t in held_tensors(obj):
        if t.untyped_storage().nbytes():
            out[storage_key(t)] = t.untyped_storage().nbytes()
    return out
