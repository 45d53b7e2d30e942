"""The embedded world model against the contract (interface.py): layout, denoiser, sampler,
history buffer, LoRA target names, save/load and config composition."""
from __future__ import annotations

import pytest
import torch

from persistworld.world_model import (EmbeddedConfig, EmbeddedWorldModel, HistoryBuffer,
                                      build_world_model, load_world_model, save_world_model)

# a tiny model: 2 UNet levels, attention at the lower one
TINY = dict(history=6, future=5, image_height=16, image_width=16, patch=4, action_hidden=16,
            block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            attention_head_dim=8, norm_num_groups=8, num_steps=4, x0_anchor="none")


@pytest.fixture(scope="module")
def model() -> EmbeddedWorldModel:
    torch.manual_seed(0)
    return build_world_model(TINY).eval()


def _inputs(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, Hs, Ws = model.latent_shape()
    buf = HistoryBuffer(torch.randn(B, model.history, C, Hs, Ws, generator=g),
                        torch.rand(B, model.history, 7, generator=g) * 2 - 1)
    acts = torch.rand(B, model.future, 7, generator=g) * 2 - 1
    return buf, acts


# -- working space ---------------------------------------------------------------------------
def test_latent_shape_and_exact_round_trip(model):
    assert model.latent_shape() == (48, 12, 4)          # 3*4*4 channels, 3 views x 16/4 rows
    frames = torch.rand(2, 3, 3, 3, 16, 16)
    z = model.encode(frames)
    assert z.shape == (2, 3, 48, 12, 4)
    torch.testing.assert_close(model.decode(z), frames, rtol=0, atol=1e-6)


def test_views_are_stacked_along_height_in_view_order(model):
    frames = torch.zeros(1, 1, 3, 3, 16, 16)
    for v in range(3):
        frames[:, :, v] = 0.25 * (v + 1)
    z = model.encode(frames)[0, 0]                            # (C, Hs, Ws)
    rows = z.shape[1] // 3
    for v in range(3):
        block = z[:, v * rows:(v + 1) * rows]
        want = (0.25 * (v + 1) - model.cfg.pixel_mean) / model.cfg.pixel_std
        torch.testing.assert_close(block, torch.full_like(block, want))


def test_raw_pixel_layout_without_patches():
    m = build_world_model({**TINY, "patch": 1, "block_out_channels": [16, 16]})
    assert m.latent_shape() == (3, 48, 16)
    frames = torch.rand(1, 2, 3, 3, 16, 16)
    torch.testing.assert_close(m.decode(m.encode(frames)), frames, rtol=0, atol=1e-6)


# -- denoiser and sampler --------------------------------------------------------------------
def test_denoise_shape_and_gradient(model):
    buf, acts = _inputs(model)
    x = torch.randn(2, model.future, *model.latent_shape(), requires_grad=True)
    out = model.denoise(x, torch.tensor([0.5, 3.0]), buf, acts)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and model.action_encoder.mlp[0].weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_denoise_is_the_edm_preconditioning_of_the_network(model):
    from persistworld.world_model import edm
    buf, acts = _inputs(model)
    x = torch.randn(2, model.future, *model.latent_shape())
    sigma = torch.tensor([0.2, 7.0])
    with torch.no_grad():
        got = model.denoise(x, sigma, buf, acts)
        s = sigma.view(-1, 1, 1, 1, 1)
        F = model.network(edm.c_in(s) * x, edm.c_noise(sigma), buf, acts)
    torch.testing.assert_close(got, edm.c_skip(s) * x + edm.c_out(s) * F)


def test_denoise_depends_on_history_and_actions(model):
    buf, acts = _inputs(model)
    x = torch.randn(2, model.future, *model.latent_shape())
    sigma = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        base = model.denoise(x, sigma, buf, acts)
        other_acts = model.denoise(x, sigma, buf, -acts)
        other_hist = model.denoise(x, sigma, HistoryBuffer(buf.latents + 1, buf.actions), acts)
    assert not torch.allclose(base, other_acts)
    assert not torch.allclose(base, other_hist)


def test_sample_chunk_is_reproducible_per_seed(model):
    buf, acts = _inputs(model)
    a = model.sample_chunk(buf, acts, generator=torch.Generator().manual_seed(7))
    b = model.sample_chunk(buf, acts, generator=torch.Generator().manual_seed(7))
    c = model.sample_chunk(buf, acts, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, model.future, *model.latent_shape())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.sample_chunk(buf, acts, noise=noise), a)


def test_sampler_start_anchor_centres_the_prior_on_the_anchor():
    """sampler_start=anchor starts the ODE at x_T = h_last + sigma_max eps: with one step the
    sample is D(h_last + sigma_max eps; sigma_max); the EDM start (noise) is D(sigma_max eps)."""
    import dataclasses
    torch.manual_seed(0)
    m = build_world_model({**TINY, "x0_anchor": "last_frame", "sampler_start": "anchor"}).eval()
    buf, acts = _inputs(m)
    noise = torch.randn((2, m.future, *m.latent_shape()), generator=torch.Generator().manual_seed(3))
    smax = torch.full((2,), m.cfg.sigma_max)
    with torch.no_grad():
        got = m.sample_chunk(buf, acts, noise=noise, num_steps=1)
        want = m.denoise(buf.latents[:, -1:] + m.cfg.sigma_max * noise, smax, buf, acts)
        torch.testing.assert_close(got, want)
        m.cfg = dataclasses.replace(m.cfg, sampler_start="noise")
        plain = m.sample_chunk(buf, acts, noise=noise, num_steps=1)
        torch.testing.assert_close(plain, m.denoise(m.cfg.sigma_max * noise, smax, buf, acts))
    with pytest.raises(ValueError, match="sampler_start"):
        build_world_model({**TINY, "sampler_start": "zero"})


def test_sample_chunk_makes_one_batched_network_call_per_step(model):
    buf, acts = _inputs(model, B=3)
    calls = []
    h = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        model.sample_chunk(buf, acts, generator=torch.Generator().manual_seed(0), num_steps=6)
    finally:
        h.remove()
    assert calls == [3] * 6


def test_sample_chunk_rows_do_not_depend_on_the_batch(model):
    buf, acts = _inputs(model, B=2)
    noise = torch.randn(2, model.future, *model.latent_shape(),
                        generator=torch.Generator().manual_seed(1))
    both = model.sample_chunk(buf, acts, noise=noise)
    one = model.sample_chunk(HistoryBuffer(buf.latents[1:], buf.actions[1:]), acts[1:],
                             noise=noise[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)


def test_sampler_sigmas_follow_the_config(model):
    s = model.sampler_sigmas()
    assert len(s) == TINY["num_steps"] + 1 and s[-1] == 0
    assert s[0].item() == pytest.approx(model.cfg.sigma_max)
    assert len(model.sampler_sigmas(9)) == 10


# -- history buffer --------------------------------------------------------------------------
def test_history_buffer_backfill_push_and_copies():
    H, C, Hs, Ws = 6, 2, 3, 1
    latent = torch.arange(2 * C * Hs * Ws, dtype=torch.float32).view(2, C, Hs, Ws)
    action = torch.tensor([[1.0] * 7, [2.0] * 7])
    buf = HistoryBuffer.backfill(latent, action, H)
    assert buf.latents.shape == (2, H, C, Hs, Ws) and buf.actions.shape == (2, H, 7)
    assert buf.history == H
    for t in range(H):
        assert torch.equal(buf.latents[:, t], latent) and torch.equal(buf.actions[:, t], action)
    new = torch.stack([torch.full((2, C, Hs, Ws), 100.0 + i) for i in range(5)], 1)  # (2, 5, ...)
    new_a = torch.stack([torch.full((2, 7), 100.0 + i) for i in range(5)], 1)
    pushed = buf.push(new, new_a)
    assert pushed.latents.shape == buf.latents.shape
    # keep the last H in order: one backfilled frame, then the 5 new ones oldest first
    assert torch.equal(pushed.latents[:, 0], latent)
    assert torch.equal(pushed.latents[:, 1:], new) and torch.equal(pushed.actions[:, 1:], new_a)
    assert torch.equal(buf.latents[:, -1], latent)           # push returned a new buffer
    twice = pushed.push(new + 100, new_a + 100)
    assert torch.equal(twice.latents[:, :1], new[:, -1:])    # H=6 > L=5: the newest old frame
    assert torch.equal(twice.latents[:, 1:], new + 100)
    k = pushed.repeat_interleave(3)
    assert k.latents.shape[0] == 6 and torch.equal(k.latents[0], k.latents[2])
    assert torch.equal(k.latents[3], pushed.latents[1])


# -- LoRA, save / load, config ---------------------------------------------------------------
def test_lora_targets_the_svd_attention_module_names(model):
    names = {n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0"
             for n, _ in model.adapter_root().named_modules()}
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        assert target in names, target
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    m = copy.deepcopy(model)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0"]), m.adapter_root())
    lora = [n for n, _ in m.named_parameters() if "lora_" in n]
    assert any("attn1.to_q" in n for n in lora) and any("attn2.to_k" in n for n in lora)
    buf, acts = _inputs(m)
    x = torch.randn(2, m.future, *m.latent_shape())
    with torch.no_grad():   # LoRA B starts at zero: the output is unchanged
        torch.testing.assert_close(m.denoise(x, torch.ones(2), buf, acts),
                                   model.denoise(x, torch.ones(2), buf, acts))


def test_save_and_load_round_trip(model, tmp_path):
    path = save_world_model(model, tmp_path / "model.pt")
    loaded = load_world_model(tmp_path)                       # a run directory works too
    assert isinstance(loaded, EmbeddedWorldModel) and not loaded.training
    assert loaded.config_dict() == model.config_dict()
    buf, acts = _inputs(model)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.sample_chunk(buf, acts, generator=g()),
                       model.sample_chunk(buf, acts, generator=g()))
    assert load_world_model(path).config_dict() == model.config_dict()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-base"):
        load_world_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.pt"):
        load_world_model(tmp_path)


def test_weights_of_another_architecture_name_the_file(model, tmp_path):
    """A file whose weights do not fit the model its own settings build (e.g. written before
    a default changed) is refused with its path and the fix, not a raw state-dict error."""
    from persistworld.errors import UserError
    blob = {"format": "persistworld.world_model", "format_version": 1,
            "config": {**model.config_dict(), "frame_head": 0},
            "state_dict": model.state_dict()}
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"old\.pt: its weights do not fit.*frame_head"):
        load_world_model(tmp_path / "old.pt")


def test_action_maps_feed_the_poses_to_the_convolutions():
    """world_model.action_maps=true: (H+L)*A pose maps + 2 coordinate maps are extra UNet
    input channels, and every frame's pose changes the output (also with the cross-attention
    tokens of the other frames unchanged)."""
    m = build_world_model({**TINY, "action_maps": True}).eval()
    H, L, A = m.history, m.future, m.cfg.action_dim
    assert m.unet.config.in_channels == (H + L) * m.cfg.channels + (H + L) * A + 2
    from persistworld.world_model.embedded import action_maps
    maps = action_maps(torch.arange(2 * 3 * 2.0).reshape(2, 3, 2), 4, 5)
    assert maps.shape == (2, 3 * 2 + 2, 4, 5)
    assert torch.equal(maps[1, 3], torch.full((4, 5), 9.0))            # sample 1, frame 1, dim 1
    assert torch.equal(maps[0, -2, :, 0], torch.linspace(-1, 1, 4))    # row coordinate
    buf, acts = _inputs(m)
    x = torch.randn(2, L, *m.latent_shape())
    with torch.no_grad():
        base = m.denoise(x, torch.ones(2), buf, acts)
        m.action_encoder.mlp.requires_grad_(False)
        for p in m.action_encoder.mlp.parameters():   # tokens no longer depend on the poses
            p.zero_()
        m.action_encoder.frame_embedding.zero_()
        a = m.denoise(x, torch.ones(2), buf, acts)
        b = m.denoise(x, torch.ones(2), buf, acts.flip(1))
    assert not torch.allclose(a, b)                  # the maps alone carry the poses
    assert base.shape == a.shape


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        EmbeddedConfig.from_mapping({"name": "embedded", "bogus": 1})
    with pytest.raises(ValueError, match="patch"):
        EmbeddedConfig.from_mapping({**TINY, "patch": 5})
    with pytest.raises(ValueError, match="x0_anchor"):
        EmbeddedConfig.from_mapping({**TINY, "x0_anchor": "first_frame"})
    with pytest.raises(ValueError, match="name"):
        build_world_model({"name": "nonexistent"})


def test_hydra_world_model_config_composes_and_builds():
    from hydra import compose, initialize_config_module
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        cfg = compose("train_base", overrides=["world_model.block_out_channels=[32,32,32]",
                                               "world_model.attention_head_dim=8"])
    m = build_world_model(cfg.world_model)
    assert (m.history, m.future) == (cfg.data.history, cfg.data.future)
    assert m.latent_shape() == (48, 3 * cfg.data.image_height // 4, cfg.data.image_width // 4)
    assert m.cfg.num_steps == 50


@pytest.mark.parametrize("anchor", ["none", "last_frame"])
def test_x0_anchor_is_the_origin_of_the_preconditioning(anchor):
    """With F = 0 (zeroed output conv), x0_hat = h + c_skip (x - h), h = 0 or the newest
    history latent: at high noise an untrained last_frame model predicts "repeat the last
    frame"."""
    from persistworld.world_model import edm
    torch.manual_seed(0)
    m = build_world_model({**TINY, "x0_anchor": anchor}).eval()
    torch.nn.init.zeros_(m.unet.conv_out.weight)
    torch.nn.init.zeros_(m.unet.conv_out.bias)
    torch.nn.init.zeros_(m.head.out.weight)               # F = head output (+ zero LinearSkip)
    torch.nn.init.zeros_(m.head.out.bias)
    buf, acts = _inputs(m)
    x = torch.randn(2, m.future, *m.latent_shape())
    sigma = torch.tensor([0.3, 50.0])
    h = buf.latents[:, -1:] if anchor == "last_frame" else torch.zeros(1)
    with torch.no_grad():
        got = m.denoise(x, sigma, buf, acts)
    want = h + edm.c_skip(sigma).view(-1, 1, 1, 1, 1) * (x - h)
    torch.testing.assert_close(got, want)


def test_linear_skip_starts_as_the_plain_unet_and_is_sigma_conditioned():
    torch.manual_seed(0)
    with_skip = build_world_model({**TINY, "linear_skip": True}).eval()
    plain = build_world_model({**TINY, "linear_skip": False}).eval()
    plain.load_state_dict({k: v for k, v in with_skip.state_dict().items()
                           if not k.startswith("skip.")})
    buf, acts = _inputs(plain)
    x = torch.randn(2, plain.future, *plain.latent_shape())
    sigma = torch.tensor([0.5, 5.0])
    with torch.no_grad():
        torch.testing.assert_close(with_skip.denoise(x, sigma, buf, acts),
                                   plain.denoise(x, sigma, buf, acts))
        # a(sigma) * x_in + b(sigma) * h_last, per future frame and channel
        torch.nn.init.normal_(with_skip.skip.mlp[-1].bias)
        out = with_skip.skip(x, buf.latents[:, -1:], torch.tensor([0.1, -0.3]))
    assert out.shape == x.shape
    lora_names = [n for n, _ in with_skip.adapter_root().named_modules()]
    assert not any(n.startswith("skip") for n in lora_names)   # LoRA sees only the UNet


def test_frame_head_gives_every_future_frame_its_own_output_channels():
    torch.manual_seed(0)
    m = build_world_model({**TINY, "frame_head": 16, "unet_out_channels": 8,
                           "linear_skip": False}).eval()
    assert m.unet.config.out_channels == 8                   # features, not L*C outputs
    buf, acts = _inputs(m)
    x = torch.randn(2, m.future, *m.latent_shape())
    sigma = torch.tensor([0.05, 3.0])
    out = m.denoise(x, sigma, buf, acts)
    assert out.shape == x.shape
    # frame l's output depends on frame l's own noisy input and its own action token
    x2 = x.clone()
    x2[:, 2] += 1.0
    with torch.no_grad():
        d = (m.denoise(x2, sigma, buf, acts) - out).abs().flatten(2).amax(2)   # (B, L)
    assert (d[:, 2] > 0).all()
    acts2 = acts.clone()
    acts2[:, 4] += 0.5
    with torch.no_grad():
        assert not torch.allclose(m.denoise(x, sigma, buf, acts2)[:, 4], out[:, 4])
    loss = m.denoise(x, sigma, buf, acts).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in m.head.parameters())
    with pytest.raises(ValueError, match="frame_head"):
        EmbeddedConfig.from_mapping({**TINY, "frame_head": -1})


def test_export_keeps_the_weights_and_may_change_only_sampler_settings(model, tmp_path):
    import yaml

    from persistworld.world_model.export import main as export_main
    run = tmp_path / "run"
    run.mkdir()
    save_world_model(model, run / "model.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"seed": 0, "root": "x"}}))
    out = tmp_path / "shipped.pt"
    assert export_main([str(run), str(out), "--float32", "--sampler", "sigma_max=10",
                        "--sampler", "sigma_min=1.0", "--command", "make it"]) == 0
    got = load_world_model(out)
    assert (got.cfg.sigma_max, got.cfg.sigma_min) == (10.0, 1.0)
    assert got.cfg.num_steps == model.cfg.num_steps
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v)
    blob = torch.load(out, weights_only=False)
    assert blob["data"] == {"seed": 0} and blob["command"] == "make it"
    with pytest.raises(ValueError, match="only sampler settings"):
        export_main([str(run), str(out), "--sampler", "patch=2"])
    with pytest.raises(ValueError, match="sigma_min"):
        export_main([str(run), str(out), "--sampler", "sigma_min=100"])   # > sigma_max
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        export_main([str(run), str(out), "--sampler", "sigma_min"])


def test_bars_benchmark_anchor_predictor_returns_the_anchor(tmp_path):
    """benchmarks/base_model.py --predictor anchor: the loaded model's chunk is its x0 anchor
    (here the last history frame), the denoiser never called; a model without an anchor is
    refused."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "base_model.py"
    spec = importlib.util.spec_from_file_location("bench_base_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    src = build_world_model({**TINY, "x0_anchor": "last_frame"}).eval()
    save_world_model(src, tmp_path / "last.pt")
    wm = bench.anchor_only(str(tmp_path / "last.pt"))
    wm.network = None                       # the denoiser must not be called
    buf, acts = _inputs(wm)
    x = wm.sample_chunk(buf, acts, num_steps=3)
    assert x.shape == (2, wm.future, *wm.latent_shape())
    torch.testing.assert_close(x, buf.latents[:, -1:].expand_as(x))
    save_world_model(build_world_model({**TINY, "x0_anchor": "none"}), tmp_path / "none.pt")
    with pytest.raises(SystemExit, match="no x0 anchor"):
        bench.anchor_only(str(tmp_path / "none.pt"))


def _camera_looking_down(h: int, w: int) -> list[float]:
    """A pinhole camera 1 m above the origin looking down: world (x, y) -> ndc (x, y)."""
    m = torch.zeros(4, 4)
    m[0, 0], m[1, 1], m[2, 2], m[3, 2], m[3, 3] = 1.0, 1.0, 0.0, 0.0, 1.0
    return m.reshape(-1).tolist()


def test_pose_maps_draw_each_frame_where_its_pose_projects():
    """world_model.pose_maps=true: every frame's end-effector position becomes a blob in each
    view that has a camera ((H+L) extra UNet channels, 2 per frame in the FrameHead); the
    wrist (no camera) stays empty; moving one future pose moves only that frame's blob and
    changes the output even with pose-blind tokens."""
    cams = [_camera_looking_down(16, 16), [], []]
    m = build_world_model({**TINY, "pose_maps": True, "pose_map_width": 2.0,
                           "pose_map_cameras": cams,
                           "pose_map_range": [[-1, -1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]}).eval()
    H, L = m.history, m.future
    assert m.unet.config.in_channels == (H + L) * m.cfg.channels + H + L
    assert m.head.inp.in_channels == m.cfg.unet_out_channels + 2 * m.cfg.channels + 2
    poses = torch.zeros(1, H + L, 7)
    poses[0, -1, :2] = torch.tensor([0.5, -0.5])      # last frame: right, lower half
    maps = m.pose_maps(poses)[0]                       # (H+L, 3*4, 4): 4x4 cells per view
    assert maps.shape == (H + L, 12, 4)
    assert float(maps[:, 4:].abs().max()) == 0.0       # views without a camera
    r0, c0 = divmod(int(maps[0, :4].argmax()), 4)
    r1, c1 = divmod(int(maps[-1, :4].argmax()), 4)
    assert (r1 > r0) and (c1 > c0)                      # row grows downward, column rightward
    assert torch.equal(maps[:-1], maps[:1].expand(H + L - 1, 12, 4))

    buf, acts = _inputs(m)
    x = torch.randn(2, L, *m.latent_shape())
    with torch.no_grad():
        for p in m.action_encoder.parameters():          # tokens no longer see the poses
            p.zero_()
        moved = acts.clone()
        moved[:, -1, :2] = -moved[:, -1, :2]
        a = m.denoise(x, torch.ones(2), buf, acts)
        b = m.denoise(x, torch.ones(2), buf, moved)
    assert not torch.allclose(a, b)


def test_pose_maps_settings_are_checked():
    from persistworld.errors import UserError
    with pytest.raises(UserError, match="pose_map_cameras is empty.*train-base` fills"):
        build_world_model({**TINY, "pose_maps": True})
    with pytest.raises(UserError, match="pose_map_cameras: 3 entries of 16"):
        build_world_model({**TINY, "pose_maps": True, "pose_map_cameras": [[1.0] * 16],
                           "pose_map_range": [[0] * 6, [1] * 6]})
    with pytest.raises(UserError, match="pose_map_range"):
        build_world_model({**TINY, "pose_maps": True, "pose_map_range": [[0, 0]],
                           "pose_map_cameras": [[1.0] * 16, [], []]})


def test_motion_weight_marks_the_cells_the_arm_covers(model):
    """trainer.motion_weight: 1 + extra on the latent cells the class masks cover at any
    frame of the chunk, dilated by one cell, in encode's layout; the denoising loss with it
    is the plain loss for a uniform weight and moves toward the weighted cells' error."""
    from persistworld.objectives.denoising import denoising_loss
    B, L, V, h, w = 2, model.future, 3, 16, 16
    masks = torch.zeros(B, L, V, h, w, dtype=torch.uint8)
    masks[0, 2, 1, 4:8, 8:12] = 1                   # sample 0: view 1, one 4x4 patch = 1 cell
    wgt = model.motion_weight(masks, 3.0)
    C, Hs, Ws = model.latent_shape()
    assert wgt.shape == (B, 1, C, Hs, Ws)
    assert float(wgt[1].max()) == 1.0               # nothing moves in sample 1
    cells = (wgt[0, 0, 0] > 1).nonzero().tolist()   # view 1 is rows 4-7 of the 12 x 4 grid
    assert [5, 2] in cells and len(cells) == 9      # the cell (row 4 + 1, col 2), dilated
    assert torch.all(wgt[0, 0, :, 5, 2] == 4.0)     # every channel of the cell
    x0 = torch.randn(B, L, C, Hs, Ws)
    buf, acts = _inputs(model)
    sigma, eps = torch.ones(B), torch.randn(B, L, C, Hs, Ws)
    with torch.no_grad():
        plain = denoising_loss(model, x0, buf, acts, sigma, eps)["loss"]
        flat = denoising_loss(model, x0, buf, acts, sigma, eps,
                              weight=torch.full_like(wgt, 2.0))["loss"]
        weighted = denoising_loss(model, x0, buf, acts, sigma, eps, weight=wgt)["loss"]
    torch.testing.assert_close(flat, plain)
    torch.testing.assert_close(weighted[1], plain[1])
    assert not torch.allclose(weighted[0], plain[0])


def test_silhouettes_are_per_frame_maps_learned_from_the_masks_only():
    """world_model.silhouettes=true: a decoder draws every frame's robot silhouette in each
    view ((H+L) extra UNet channels, 2 per frame in the FrameHead), laid out like the latent
    grid; its target is the robot's share of each latent cell; the denoising loss sends it no
    gradient (``auxiliary_losses`` trains it) and the denoiser's output depends on it."""
    m = build_world_model({**TINY, "silhouettes": True, "silhouette_hidden": 16}).eval()
    H, L, C = m.history, m.future, m.cfg.channels
    assert m.unet.config.in_channels == (H + L) * C + H + L
    assert m.head.inp.in_channels == m.cfg.unet_out_channels + 2 * C + 2
    assert m.auxiliary_modules() == [m.silhouettes]
    buf, acts = _inputs(m)
    poses = torch.cat([buf.actions, acts], 1)
    maps = m.silhouettes(poses)
    assert maps.shape == (2, H + L, 12, 4) and 0 < float(maps.min()) < float(maps.max()) < 1
    masks = torch.zeros(2, H + L, 3, 16, 16, dtype=torch.uint8)
    masks[:, :, 1, 4:8, 8:10] = 1                   # view 1, half of cell (1, 2) is robot
    masks[:, :, 0, :4, :4] = 2                      # the object is not the robot
    target = m.silhouettes.target(masks)            # (2, H+L, V, 4, 4)
    assert float(target[0, 0, 1, 1, 2]) == 0.5 and float(target.sum()) == 0.5 * 2 * (H + L)
    loss = m.auxiliary_losses(poses, masks, torch.rand(2, H + L, 3, 3, 16, 16))["silhouette"]
    assert loss.shape == (2,)
    loss.sum().backward()
    assert all(p.grad is not None for p in m.silhouettes.parameters())
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("sil"))
    m.zero_grad(set_to_none=True)
    x = torch.randn(2, L, *m.latent_shape())
    m.denoise(x, torch.ones(2), buf, acts).pow(2).sum().backward()
    assert all(p.grad is None for p in m.silhouettes.parameters())
    with torch.no_grad():
        for p in m.action_encoder.parameters():     # tokens no longer see the poses
            p.zero_()
        a = m.denoise(x, torch.ones(2), buf, acts)
        m.silhouettes.out.bias.add_(3.0)
        b = m.denoise(x, torch.ones(2), buf, acts)
    assert not torch.allclose(a, b)
    with pytest.raises(Exception, match="silhouette_hidden"):
        build_world_model({**TINY, "silhouettes": True, "silhouette_hidden": 0})


def test_composite_anchor_moves_the_robot_to_each_future_pose():
    """x0_anchor=composite: per future frame the last frame with the robot painted where the
    decoded silhouette of that frame's pose puts it (its fitted colour), the view's mean
    background where it leaves, the last frame elsewhere; with F = 0 the denoiser returns that
    composite at high noise, so its output depends on the future poses, and the sampler
    starts around it. Needs silhouettes."""
    from persistworld.errors import UserError
    from persistworld.world_model import edm
    with pytest.raises(UserError, match="silhouettes=true"):
        build_world_model({**TINY, "x0_anchor": "composite"})
    torch.manual_seed(0)
    m = build_world_model({**TINY, "x0_anchor": "composite", "silhouettes": True,
                           "silhouette_hidden": 16, "sampler_start": "anchor"}).eval()
    sil = m.silhouettes

    def logits(poses):                          # the robot fills cell (0, 0) of ext1 iff x > 0
        out = torch.full((*poses.shape[:-1], 3, 4, 4), -50.0)
        out[..., 0, 0, 0] = 100.0 * poses[..., 0]
        return out
    sil.logits = logits
    with torch.no_grad():
        sil.colour.fill_(0.9)
    poses = torch.zeros(1, 1 + m.future, 7)
    poses[0, 0, 0] = 1.0                        # the robot is in cell (0, 0) now,
    poses[0, 1:, 0] = -1.0                      # leaves it,
    poses[0, -1, 0] = 1.0                       # and is back at the last future frame
    last = torch.rand(1, 3, 3, 16, 16)
    comp = sil.composite(last, poses)           # (1, L, V, 3, h, w)
    rest = torch.ones(16, 16, dtype=torch.bool)
    rest[:4, :4] = False
    for c in range(3):                          # where it left: the view's mean background
        assert torch.allclose(comp[0, 0, 0, c, :4, :4], last[0, 0, c][rest].mean())
    assert torch.equal(comp[0, -1], last[0])    # where it stays: its own pixels
    assert torch.equal(comp[0, :, 0, :, 4:], last[0, 0, :, 4:].expand(m.future, 3, 12, 16))
    assert torch.equal(comp[0, :, 1:], last[0, 1:].expand(m.future, 2, 3, 16, 16))
    arrives = torch.zeros_like(poses)           # absent now, there in the last frame only
    arrives[0, :, 0] = -1.0
    arrives[0, -1, 0] = 1.0
    comp_in = sil.composite(last, arrives)
    assert torch.equal(comp_in[0, -1, 0, :, :4, :4], torch.full((3, 4, 4), 0.9))
    assert torch.equal(comp_in[0, :-1], last.expand(m.future - 1, 3, 3, 16, 16))
    torch.nn.init.zeros_(m.head.out.weight)     # F = 0
    torch.nn.init.zeros_(m.head.out.bias)
    buf, _ = _inputs(m, B=1)
    buf.latents[:, -1] = m.encode(last[:, None])[:, 0]
    buf.actions[:, -1] = poses[:, 0]
    acts = poses[:, 1:].clone()
    sigma = torch.tensor([80.0])
    x = torch.randn(1, m.future, *m.latent_shape())
    with torch.no_grad():
        got = m.denoise(x, sigma, buf, acts)
        anchor = m.encode(comp)
        torch.testing.assert_close(got, anchor + edm.c_skip(sigma).view(-1, 1, 1, 1, 1)
                                   * (x - anchor))
        other = acts.clone()
        other[:, -1, 0] = -1.0
        assert not torch.allclose(m.denoise(x, sigma, buf, other), got)
        noise = torch.randn_like(x)
        one = m.sample_chunk(buf, acts, noise=noise, num_steps=1)
        torch.testing.assert_close(one, m.denoise(anchor + m.cfg.sigma_max * noise,
                                                  torch.full((1,), m.cfg.sigma_max), buf, acts))



def test_output_gate_copies_the_anchor_where_it_is_closed():
    """world_model.output_gate: x0_hat = anchor + g * residual, g per future frame and latent
    cell from the FrameHead. Closed (g -> 0) the denoiser returns the anchor exactly whatever
    the noisy input; open (g -> 1) it is the ungated denoiser; the gate gets gradient; and it
    needs a FrameHead and an anchor (checked before building)."""
    from persistworld.errors import UserError
    for bad in ({"frame_head": 0}, {"x0_anchor": "none"}):
        with pytest.raises(UserError, match="output_gate"):
            build_world_model({**TINY, "x0_anchor": "last_frame", "output_gate": True, **bad})
    torch.manual_seed(0)
    gated = build_world_model({**TINY, "x0_anchor": "last_frame", "output_gate": True})
    torch.manual_seed(0)
    plain = build_world_model({**TINY, "x0_anchor": "last_frame"})
    assert abs(gated.head.gate.conv.bias.item() * gated.head.gate.gain - 2.0) < 1e-6
    assert not gated.head.gate.conv.weight.any()
    gated.load_state_dict(plain.state_dict(), strict=False)
    buf, acts = _inputs(gated)
    x = torch.randn(2, gated.future, *gated.latent_shape())
    sigma = torch.tensor([3.0, 0.5])
    with torch.no_grad():
        gated.head.gate.conv.bias.fill_(-1e4)                # closed
        torch.testing.assert_close(gated.denoise(x, sigma, buf, acts),
                                   buf.latents[:, -1:].expand_as(x), rtol=0, atol=0)
        torch.testing.assert_close(gated.denoise(2 * x, sigma, buf, acts),
                                   buf.latents[:, -1:].expand_as(x), rtol=0, atol=0)
        gated.head.gate.conv.bias.fill_(1e4)                 # open: the ungated denoiser
        torch.testing.assert_close(gated.denoise(x, sigma, buf, acts),
                                   plain.denoise(x, sigma, buf, acts))
        gated.head.gate.conv.bias.fill_(0.0)                 # half way
        h = buf.latents[:, -1:]
        torch.testing.assert_close(gated.denoise(x, sigma, buf, acts) - h,
                                   0.5 * (plain.denoise(x, sigma, buf, acts) - h))
    gated.denoise(x, sigma, buf, acts).square().mean().backward()
    assert gated.head.gate.conv.weight.grad.abs().sum() > 0

def test_silhouette_loss_fits_the_robot_colour():
    """The decoder's loss with pixels adds the squared error of the per-view robot colour on
    the robot's pixels only: it is smallest at their mean."""
    m = build_world_model({**TINY, "silhouettes": True, "silhouette_hidden": 16})
    poses = torch.zeros(1, 2, 7)
    masks = torch.zeros(1, 2, 3, 16, 16, dtype=torch.uint8)
    masks[..., :8, :] = 1
    frames = torch.rand(1, 2, 3, 3, 16, 16)
    frames[..., :8, :] = 0.25                       # the robot's pixels
    with torch.no_grad():
        m.silhouettes.colour.fill_(0.25)
        at_mean = m.auxiliary_losses(poses, masks, frames)["silhouette"]
        bce = m.auxiliary_losses(poses, masks)["silhouette"]
        m.silhouettes.colour.fill_(0.75)
        off = m.auxiliary_losses(poses, masks, frames)["silhouette"]
    torch.testing.assert_close(at_mean, bce)
    torch.testing.assert_close(off - bce, torch.tensor([0.25]))
