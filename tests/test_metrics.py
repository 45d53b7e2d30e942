"""Image metrics: genuine LPIPS (published values), SSIM / PSNR (hand-computed cases, torchmetrics
reference), masked metrics and frame_metrics shape handling."""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from persistworld.metrics import (
    LPIPS,
    MIN_SIZE,
    PSNR_MAX_DB,
    find_lpips_weights,
    frame_metrics,
    get_lpips,
    masked_metrics,
    psnr,
    ssim,
    ssim_map,
)
from persistworld.metrics.lpips import WEIGHTS_ENV_VAR, load_lpips_state_dict

REF = Path(__file__).resolve().parents[1].parent / "shared/reference/lpips"
IN_CI = os.environ.get("CI") == "true"

# Published LPIPS(alex, v0.1) values, /work/shared/reference/lpips/README.md.
PUBLISHED = [
    ("example/ex_ref.png", "example/ex_p0.png", 0.722),
    ("example/ex_ref.png", "example/ex_p1.png", 0.138),
    ("calib/ref/I03.png", "calib/dist/I03.png", 0.7237),
    ("calib/ref/I04.png", "calib/dist/I04.png", 0.2572),
    ("calib/ref/I06.png", "calib/dist/I06.png", 0.05079),
    ("calib/ref/I08.png", "calib/dist/I08.png", 0.05205),
    ("calib/ref/I19.png", "calib/dist/I19.png", 0.4253),
]
C1, C2 = 0.01**2, 0.03**2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches: 1 thread is as fast and, on a shared 2-core box, avoids OpenMP barrier
    spinning (measured 20-30x slowdowns with 2 threads while other processes load the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (CI=true: this check must run in CI)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def lpips_model() -> LPIPS:
    try:
        find_lpips_weights()
    except FileNotFoundError as exc:
        _missing(str(exc))
    return get_lpips("cpu")


@pytest.fixture(scope="module")
def ref_dir() -> Path:
    if not REF.is_dir():
        _missing(f"LPIPS reference images not found at {REF}")
    return REF


def _load(path: Path) -> torch.Tensor:
    from PIL import Image

    arr = np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


def _rand(n=3, c=3, h=64, w=64, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    y = (x + 0.15 * torch.randn(n, c, h, w, generator=g)).clamp(0, 1)
    return x, y


# --------------------------------------------------------------------------- LPIPS genuine


@pytest.mark.parametrize(("a", "b", "published"), PUBLISHED, ids=[p[1] for p in PUBLISHED])
def test_lpips_reproduces_published_values(lpips_model, ref_dir, a, b, published):
    with torch.no_grad():
        d = lpips_model(_load(ref_dir / a), _load(ref_dir / b)).item()
    assert abs(d - published) < 1e-3, f"LPIPS {a} vs {b}: {d:.5f}, published {published}"


def test_lpips_bgr_control_does_not_match(lpips_model, ref_dir):
    x, y = _load(ref_dir / "calib/ref/I03.png"), _load(ref_dir / "calib/dist/I03.png")
    with torch.no_grad():
        bgr = lpips_model(x.flip(1), y.flip(1)).item()
    assert abs(bgr - 0.7237) > 0.01  # the check is sensitive to channel order
    assert abs(bgr - 0.698) < 2e-3  # and this is the documented control value


def test_lpips_random_trunk_control_does_not_match(ref_dir):
    try:
        sd = load_lpips_state_dict()
    except FileNotFoundError as exc:
        _missing(str(exc))
    torch.manual_seed(0)
    model = LPIPS(pretrained=False).eval()
    heads = {k[len("lins.") :]: v for k, v in sd.items() if k.startswith("lins.")}
    model.lins.load_state_dict(heads)
    x, y = _load(ref_dir / "calib/ref/I03.png"), _load(ref_dir / "calib/dist/I03.png")
    with torch.no_grad():
        assert abs(model(x, y).item() - 0.7237) > 0.1


def test_lpips_identity_symmetry_batching(lpips_model):
    x, y = _rand(4)
    with torch.no_grad():
        assert torch.equal(lpips_model(x, x), torch.zeros(4))
        d_xy, d_yx = lpips_model(x, y), lpips_model(y, x)
        single = torch.cat([lpips_model(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    assert d_xy.shape == (4,)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_xy, single, rtol=1e-4, atol=1e-6)


def test_lpips_sizes_and_input_checks(lpips_model):
    with torch.no_grad():
        for h, w in [(MIN_SIZE, MIN_SIZE), (64, 64), (48, 80)]:
            x, y = _rand(2, h=h, w=w)
            assert lpips_model(x, y).shape == (2,)
        # 64x64 keeps non-empty maps on all five layers
        assert [m.shape[-1] for m in lpips_model.layer_maps(*_rand(1))] == [15, 7, 3, 3, 3]
    with pytest.raises(ValueError, match="at least 31x31"):
        lpips_model(*_rand(1, h=30, w=64))
    with pytest.raises(ValueError):
        lpips_model(*_rand(1, c=1))
    with pytest.raises(TypeError):
        u8 = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
        lpips_model(u8, u8)


def test_get_lpips_cached_frozen(lpips_model):
    assert get_lpips("cpu") is lpips_model
    assert not lpips_model.training
    assert not any(p.requires_grad for p in lpips_model.parameters())


def test_weights_lookup_errors_and_env(tmp_path, monkeypatch, lpips_model):
    with pytest.raises(FileNotFoundError, match=r"persistworld fetch-lpips"):
        find_lpips_weights(tmp_path / "nope.ckpt")
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_ENV_VAR):
        find_lpips_weights()
    monkeypatch.delenv(WEIGHTS_ENV_VAR)
    src = find_lpips_weights()
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(src))
    assert find_lpips_weights() == src
    # the weight file is data: anything but numpy arrays is refused
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": __import__("collections").OrderedDict()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_lpips_state_dict(evil)


# --------------------------------------------------------------------------- SSIM / PSNR


def test_ssim_identical_is_one():
    x, _ = _rand(2)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.5), (0.0, 1.0), (0.7, 0.7), (0.9, 0.1)])
def test_ssim_constant_images_closed_form(a, b):
    # Variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere.
    x = torch.full((1, 3, 32, 40), a)
    y = torch.full((1, 3, 32, 40), b)
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_torchmetrics_reflect_padded_variant():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    for h, w in [(64, 64), (37, 52)]:
        x, y = _rand(3, h=h, w=w, seed=h)
        ref, ref_map = tm_ssim(x, y, data_range=1.0, reduction="none", return_full_image=True)
        torch.testing.assert_close(ssim(x, y), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ssim_map(x, y), ref_map, rtol=0, atol=1e-4)


def test_psnr_hand_computed():
    x = torch.full((2, 3, 16, 16), 0.3)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # MSE 0.01
    assert psnr(x, x).tolist() == [PSNR_MAX_DB, PSNR_MAX_DB]  # capped, finite
    xr, yr = _rand(3)
    mse = ((xr - yr) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(xr, yr), 10 * torch.log10(1 / mse))
    from torchmetrics.functional.image import peak_signal_noise_ratio

    ref = peak_signal_noise_ratio(xr, yr, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(xr, yr), ref)


def test_inputs_are_clamped_and_uint8_rejected():
    x = torch.full((1, 3, 16, 16), 0.5)
    clamped = psnr(x, torch.full_like(x, 1.7)).item()  # 1.7 -> 1.0: MSE 0.25
    assert clamped == pytest.approx(10 * math.log10(1 / 0.25), abs=1e-4)
    with pytest.raises(TypeError):
        psnr(x.to(torch.uint8), x.to(torch.uint8))


# --------------------------------------------------------------------------- masked metrics


def test_masked_full_mask_equals_unmasked(lpips_model):
    x, y = _rand(3)
    full = torch.ones(3, 64, 64, dtype=torch.bool)
    res = masked_metrics(x, y, full, lpips_model)
    torch.testing.assert_close(res["ssim"], ssim(x, y), rtol=0, atol=1e-5)
    torch.testing.assert_close(res["psnr"], psnr(x, y), rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(res["lpips"], lpips_model(x, y), rtol=1e-5, atol=1e-6)


def test_masked_empty_is_nan(lpips_model):
    x, y = _rand(2)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    mask[1] = False
    res = masked_metrics(x, y, mask, lpips_model)
    for name in ("ssim", "psnr", "lpips"):
        assert not torch.isnan(res[name][0]), name
        assert torch.isnan(res[name][1]), name


def test_masked_definitions_partial_mask(lpips_model):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[..., 40:] = (y[..., 40:] + 0.1).clamp(max=1)  # change only the right part
    inside = torch.zeros(1, 64, 64, dtype=torch.bool)
    inside[..., 44:] = True
    outside = torch.zeros(1, 64, 64, dtype=torch.bool)
    outside[..., :20] = True
    r_in = masked_metrics(x, y, inside, lpips_model)
    r_out = masked_metrics(x, y, outside, lpips_model)
    # PSNR: MSE over masked pixels only
    mse_in = ((x - y) ** 2)[..., 44:].mean()
    assert r_in["psnr"].item() == pytest.approx(10 * math.log10(1 / mse_in.item()), abs=1e-3)
    assert r_out["psnr"].item() == PSNR_MAX_DB
    # SSIM: full-frame map, averaged over channels, then over the masked pixels
    smap = ssim_map(x, y).mean(dim=1)
    assert r_in["ssim"].item() == pytest.approx(smap[inside].mean().item(), abs=1e-6)
    assert r_out["ssim"].item() == pytest.approx(1.0, abs=1e-6)
    # LPIPS: mask-weighted layer maps; the unchanged region scores lower than the changed one
    assert r_out["lpips"].item() < r_in["lpips"].item()


# --------------------------------------------------------------------------- frame_metrics


def test_frame_metrics_shapes_broadcast_and_chunking(lpips_model):
    k, t, v = 2, 3, 2
    g = torch.Generator().manual_seed(2)
    target = torch.rand(t, v, 3, 64, 64, generator=g)
    pred = (target + 0.1 * torch.randn(k, t, v, 3, 64, 64, generator=g)).clamp(0, 1)
    masks = {"object": torch.rand(t, v, 64, 64, generator=g) > 0.7}
    masks["object"][1, 0] = False  # one empty mask -> NaN there
    out = frame_metrics(pred, target, lpips_model, masks=masks, chunk_size=5)
    assert set(out) == {"ssim", "psnr", "lpips", "object_ssim", "object_psnr", "object_lpips"}
    assert all(val.shape == (k, t, v) and val.dtype == torch.float32 for val in out.values())
    flat_p = pred.reshape(-1, 3, 64, 64)
    flat_t = target.expand(k, t, v, 3, 64, 64).reshape(-1, 3, 64, 64)
    torch.testing.assert_close(out["ssim"].reshape(-1), ssim(flat_p, flat_t), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["psnr"].reshape(-1), psnr(flat_p, flat_t), rtol=0, atol=1e-4)
    with torch.no_grad():
        ref = lpips_model(flat_p, flat_t)
    torch.testing.assert_close(out["lpips"].reshape(-1), ref, rtol=1e-4, atol=1e-6)
    assert torch.isnan(out["object_psnr"][:, 1, 0]).all()
    assert not torch.isnan(out["object_psnr"][:, 0, 0]).any()
    one_chunk = frame_metrics(pred, target, lpips_model, masks=masks, chunk_size=1000)
    for key in out:
        torch.testing.assert_close(out[key], one_chunk[key], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_frame_metrics_single_frame_and_errors(lpips_model):
    x, y = _rand(1)
    out = frame_metrics(x[0], y[0], lpips_model, metrics=("psnr", "lpips"))
    assert set(out) == {"psnr", "lpips"} and out["psnr"].shape == ()
    with pytest.raises(ValueError):
        frame_metrics(x, y[..., :32], lpips_model)
    with pytest.raises(ValueError, match="unknown metrics"):
        frame_metrics(x, y, lpips_model, metrics=("fid",))
