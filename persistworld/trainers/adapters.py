"""One frozen backbone, named LoRA adapters: the policy, the old policy and the policy EMA.

Post-training needs four versions of the world model (METHOD.md §2): the policy v_theta
(trained), the old policy v_old (an EMA of the policy, for the NFT loss), the policy EMA
(optional, for evaluation and export) and the base model (the KL reference). They differ only
in the LoRA factors and in the action encoder, so they are held as ONE backbone with one peft
adapter per role,

    policy | old | ema   LoRA adapter of that name + that role's action-encoder copy
    base                 adapters disabled + the base action encoder (as DiffusionNFT
                         computes its KL reference)

and ``with roles.use("old"):`` makes the model act as that role. Every frozen tensor exists
once, whatever the number of roles (``tests/test_post_train.py`` counts storages). With
``train_action_encoder=false`` the action encoder is frozen and shared by all roles too.

Checkpoints name each role's tensors as a single-adapter model would (``lora_A.default.``),
so post-training checkpoints written before named adapters existed load unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch

from persistworld.errors import UserError

ENCODER = "action_encoder"      # the world-model attribute that holds the action encoder
BASE = "base"                   # the role with adapters disabled
ADAPTER_NAME = "default"        # the adapter name in checkpoints (single-adapter layout)


def _lora_layers(root: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in root.modules() if isinstance(m, LoraLayer)]


class NamedAdapters:
    """The roles of post-training as adapters on one backbone (``model``, changed in place)."""

    def __init__(self, model: torch.nn.Module, roles: tuple[str, ...], rank: int,
                 alpha: float, target_modules: list[str], train_action_encoder: bool = True):
        from peft import LoraConfig, inject_adapter_in_model
        if roles[0] != "policy" or BASE in roles or len(set(roles)) != len(roles):
            raise ValueError(f"roles must start with 'policy', be unique and exclude "
                             f"{BASE!r}: {roles}")
        self.model, self.roles = model, tuple(roles)
        model.requires_grad_(False)
        root = model.adapter_root()
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                          target_modules=list(target_modules))
        for i, role in enumerate(self.roles):
            # the policy's factors draw from the global generator exactly as one adapter did;
            # the other roles are copied from it below, so their draws must not shift it
            rng = contextlib.nullcontext() if i == 0 else torch.random.fork_rng(devices=[])
            with rng, warnings.catch_warnings():
                # peft warns that a second adapter is being added: that is the point here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                try:
                    inject_adapter_in_model(lora, root, adapter_name=role)
                except ValueError as e:
                    raise UserError(f"lora.target_modules={list(target_modules)}: {e}") from e
        self.layers = _lora_layers(root)
        if not self.layers:
            raise UserError(f"lora.target_modules={list(target_modules)} matched no module of "
                            f"the world model's UNet")
        base_encoder = getattr(model, ENCODER)
        self.encoders: dict[str, torch.nn.Module] = {BASE: base_encoder}
        for role in self.roles:
            self.encoders[role] = (copy.deepcopy(base_encoder) if train_action_encoder
                                   else base_encoder)
        self._layer_ids = set(map(id, self.layers))
        self._trainable: set[int] = set()
        self.active: str | None = None
        self._cache: dict[str, list[tuple[str, torch.nn.Parameter]]] = {
            role: self._collect(role) for role in self.roles}
        self._trainable = {id(p) for _, p in self._cache["policy"]}
        self._activate("policy")
        self._reflag()                     # _collect left "policy" active before _trainable
        for role in self.roles[1:]:
            self.copy_("policy", role)

    # -- switching -----------------------------------------------------------------------
    def _activate(self, role: str) -> None:
        if role == self.active:
            return
        if role != BASE and role not in self.roles:
            raise KeyError(f"no role {role!r} (roles: {self.roles + (BASE,)})")
        for layer in self.layers:
            if role == BASE:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(role)
                layer.enable_adapters(True)
        setattr(self.model, ENCODER, self.encoders[role])
        self.active = role
        self._reflag()

    def _reflag(self) -> None:
        """peft's set_adapter / enable_adapters also toggle requires_grad; only the policy's
        parameters train, whichever role is active."""
        for layer in self.layers:
            for p in layer.parameters():
                p.requires_grad_(id(p) in self._trainable)
        for enc in self.encoders.values():
            for p in enc.parameters():
                p.requires_grad_(id(p) in self._trainable)

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[torch.nn.Module]:
        """The model acting as ``role`` inside the block (then as before)."""
        before = self.active
        self._activate(role)
        try:
            yield self.model
        finally:
            if before is not None:
                self._activate(before)

    # -- the tensors of a role -----------------------------------------------------------
    def _named(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        """(checkpoint name, parameter) of ``role``'s own tensors, in the model's order."""
        return self._cache[role]

    def _collect(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        with self.use(role):
            for name, p in self.model.named_parameters():
                parts = name.split(".")
                lora = [i for i, s in enumerate(parts[:-1]) if s.startswith("lora_")]
                if lora:
                    i = lora[-1] + 1
                    if parts[i] != role:
                        continue
                    out.append((".".join(parts[:i] + [ADAPTER_NAME] + parts[i + 1:]), p))
                elif name.startswith(ENCODER + ".") and self.encoders[role] is not \
                        self.encoders[BASE]:
                    out.append((name, p))
        return out

    def params(self, role: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self._named(role)]

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The policy's trainable parameters (what the optimiser steps), checkpoint-named."""
        return self._named("policy")

    def state(self, role: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._named(role)}

    @torch.no_grad()
    def load_state(self, role: str, state: dict[str, torch.Tensor], source: str = "") -> None:
        named = dict(self._named(role))
        if set(state) != set(named):
            missing, extra = sorted(set(named) - set(state)), sorted(set(state) - set(named))
            raise UserError(f"{source or 'checkpoint'}: the {role!r} weights do not fit this "
                            f"model's adapters (missing {missing[:3]}, unexpected {extra[:3]}); "
                            f"it was written with other lora.* / world-model settings: resume "
                            f"with those or start a new run_dir")
        for n, v in state.items():
            named[n].copy_(v)

    @torch.no_grad()
    def copy_(self, source: str, target: str) -> None:
        for t, s in zip(self.params(target), self.params(source), strict=True):
            t.copy_(s)

    def merged_state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """A plain (adapter-free) state dict of ``role``: its LoRA deltas merged into the base
        weights and its action encoder, so the post-trained model loads like any base model.
        No copy of the backbone is made (the deltas are added tensor by tensor)."""
        deltas = {}
        root_name = next(n for n, m in self.model.named_modules()
                         if m is self.model.adapter_root())
        for name, m in self.model.adapter_root().named_modules():
            if id(m) in self._layer_ids:
                full = f"{root_name}.{name}" if root_name else name
                deltas[f"{full}.base_layer.weight"] = m.get_delta_weight(role)
        out = {}
        with self.use(role), torch.no_grad():
            for k, v in self.model.state_dict().items():
                if ".lora_" in k:
                    continue
                if k in deltas:
                    v = v + deltas[k].to(v.dtype)
                out[k.replace(".base_layer.", ".")] = v
        return out

    def frozen_checksums(self) -> dict[str, torch.Tensor]:
        """(sum, sum of squares) in float64 of every frozen tensor: a cheap check that they
        stay unchanged without holding a copy of the backbone."""
        with self.use(BASE):
            return {n: torch.stack([p.detach().double().sum(), p.detach().double().square()
                                    .sum()]).cpu()
                    for n, p in self.model.named_parameters() if id(p) not in self._trainable
                    and ".lora_" not in n}
