"""The Ctrl-World backend without the real weights: a tiny configuration of the same classes
(random init, from configs only, no download) and synthetic checkpoints in the released key
layout. Strict loading and its key map, the view / VAE layout, frame-level conditioning,
the history memory, sampler parity with diffusers' EulerDiscreteScheduler, LoRA on spatial and
temporal attention, and one post-training run end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from persistworld.errors import MissingFile, UserError
from persistworld.world_model import build_world_model, load_world_model, save_world_model
from persistworld.world_model.ctrl_world import (CtrlWorldConfig, _stock_unet_class, defaults,
                                                 frame_level_unet_class,
                                                 load_released_checkpoint, unet_kwargs)
from persistworld.world_model.interface import HistoryBuffer

# the classes of the released model at a size that runs in a test (views 16 x 32 -> latents
# 4 x 8 x 16 per view, stacked to 4 x 24 x 16)
TINY = dict(image_height=16, image_width=32, block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
            up_block_types=["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
            num_attention_heads=[2, 4], layers_per_block=1, cross_attention_dim=32,
            action_hidden=32, addition_time_embed_dim=8, vae_block_out_channels=[32, 32],
            vae_layers_per_block=1, num_steps=4, decode_chunk=3)


def tiny(**over) -> "torch.nn.Module":
    torch.manual_seed(0)
    return build_world_model({"name": "ctrl_world", **TINY, **over}).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def _buffer(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, Hs, Ws = model.latent_shape()
    return HistoryBuffer(torch.randn(B, model.memory, C, Hs, Ws, generator=g),
                         torch.rand(B, model.memory, 7, generator=g) * 2 - 1)


# ---- configuration ------------------------------------------------------------------------
def test_defaults_are_the_released_architecture():
    cfg = CtrlWorldConfig.from_mapping({})
    assert cfg.block_out_channels == [320, 640, 1280, 1280]
    assert cfg.num_attention_heads == [5, 10, 20, 20]
    assert (cfg.history, cfg.future, cfg.latent_shape) == (6, 4, (4, 72, 40))
    assert (cfg.sigma_min, cfg.sigma_max, cfg.num_steps) == (0.002, 700.0, 50)
    assert unet_kwargs(cfg)["in_channels"] == 8 and unet_kwargs(cfg)["num_frames"] == 11


@pytest.mark.parametrize("over,setting", [
    ({"history_policy": "dense"}, "world_model.history_policy"),
    ({"history_idx": [0, -2]}, "world_model.history_idx"),
    ({"history_idx": [0, 0, -8, -6, -4, 2]}, "world_model.history_idx"),
    ({"memory": 20}, "world_model.memory"),                       # [.., -8] reaches 29 back
    ({"history_policy": "contiguous"}, "world_model.memory"),     # needs memory = H + 1
    ({"action_hidden": 64}, "world_model.action_hidden"),
    ({"num_attention_heads": [2]}, "world_model.num_attention_heads"),
    ({"image_height": 17}, "world_model.image_height"),           # VAE downsamples by 2
    ({"image_width": 34}, "world_model.image_width"),             # 17 latent columns, 2 levels
    ({"current_slot": "drop"}, "world_model.current_slot"),
    ({"dtype": "fp8"}, "world_model.dtype"),
    ({"colour": 1}, "unknown world_model settings"),
])
def test_bad_settings_name_the_setting(over, setting):
    with pytest.raises(UserError, match=setting.replace(".", r"\.")):
        CtrlWorldConfig.from_mapping({**TINY, **over})


# ---- the UNet: stock names, one token per frame -------------------------------------------
def test_frame_level_unet_has_the_stock_keys_and_loads_strictly_both_ways(model):
    kw = unet_kwargs(model.cfg)
    stock = _stock_unet_class()(**kw)
    ours = frame_level_unet_class()(**kw)
    assert isinstance(ours, _stock_unet_class())
    assert list(stock.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(ours.state_dict(), strict=True)


def _unet_inputs(model, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, Hs, Ws = model.latent_shape()
    F = model.history + 1 + model.future
    x = torch.randn(B, F, 2 * C, Hs, Ws, generator=g)
    ids = model.added_time_ids(B, x.device, x.dtype)
    return x, torch.full((B,), 0.3), ids, F


def test_equal_frame_tokens_reproduce_the_stock_unet(model):
    """With the same token on every frame, the frame-level forward IS diffusers' forward."""
    stock = _stock_unet_class()(**unet_kwargs(model.cfg)).eval()
    stock.load_state_dict(model.unet.state_dict())
    x, t, ids, F = _unet_inputs(model)
    token = torch.randn(2, 1, model.cfg.cross_attention_dim)
    with torch.no_grad():
        ours = model.unet(x, t, token.expand(2, F, -1), ids).sample
        ref = stock(x, t, token, ids).sample
        plain = model.unet(x, t, token, ids, frame_level_cond=False).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)


def test_each_frame_cross_attends_to_its_own_token(model):
    """The spatial cross-attention of frame f sees token f, and only it."""
    x, t, ids, F = _unet_inputs(model)
    tokens = torch.randn(2, F, model.cfg.cross_attention_dim)
    seen = []
    attn2 = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hook = attn2.register_forward_hook(lambda m, a, kw, out: seen.append(kw.get(
        "encoder_hidden_states", a[1] if len(a) > 1 else None)), with_kwargs=True)
    try:
        with torch.no_grad():
            model.unet(x, t, tokens, ids)
    finally:
        hook.remove()
    assert seen and torch.equal(seen[0], tokens.reshape(2 * F, 1, -1))


def test_changing_one_frames_pose_changes_that_frames_token_only(model):
    a = torch.rand(2, 11, 7)
    b = a.clone()
    b[:, 8] += 0.5
    with torch.no_grad():
        ta, tb = model.action_encoder(a), model.action_encoder(b)
    changed = (ta - tb).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [f == 8 for f in range(11)]
    assert [n for n, _ in model.action_encoder.named_parameters()] == [
        f"action_encode.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


# ---- layout: views along height, temporal VAE per view in chunks ---------------------------
def test_encode_stacks_views_along_height_and_decode_is_per_view_in_chunks(model):
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(1, 5, 3, 3, 16, 32, generator=g)
    z = model.encode(frames)
    assert z.shape == (1, 5, 4, 24, 16)
    for v in range(3):                                   # view v -> rows 8v .. 8v+7
        alone = model.encode(frames[:, :, v:v + 1].expand(-1, -1, 3, -1, -1, -1))
        torch.testing.assert_close(z[..., 8 * v:8 * v + 8, :], alone[..., :8, :],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.split_views(z)[:, :, 1], z[..., 8:16, :])
    with torch.no_grad():
        pix = model.decode(z)
        vae, s = model.vae, model.cfg.scaling_factor
        wrist = z[0, :, :, 16:24] / s                    # (5, 4, 8, 16)
        ref = torch.cat([vae.decode(wrist[:3], num_frames=3).sample,
                         vae.decode(wrist[3:], num_frames=2).sample])
        one_by_one = torch.cat([vae.decode(wrist[i:i + 1], num_frames=1).sample
                                for i in range(5)])
    assert pix.shape == (1, 5, 3, 3, 16, 32)
    torch.testing.assert_close(pix[0, :, 2], (ref + 1) / 2, atol=1e-5, rtol=1e-5)
    # the temporal decoder mixes the frames of a chunk: chunking is part of the layout
    assert not torch.allclose(ref, one_by_one, atol=1e-4)


# ---- history memory --------------------------------------------------------------------------
def _ctrl_world_memory(first, chunks, idx):
    """Ctrl-World's rollout memory, written as its scripts keep it: 24 copies of the first
    latent, then the last frame of every chunk; slots gathered by ``idx``."""
    mem = [first] * 24
    for c in chunks:
        mem.append(c[-1])
    return [mem[i] for i in idx], mem[-1]


@pytest.mark.parametrize("idx", [[0, 0, -8, -6, -4, -2], [0, 0, -12, -9, -6, -3]])
def test_sparse_history_gathers_ctrl_worlds_memory(idx):
    m = tiny(history_idx=idx)
    L = m.future
    first = torch.full((4, 24, 16), -1.0)
    buf = m.start_buffer(first[None], torch.zeros(1, 7))
    chunks = []
    for c in range(10):
        frames = torch.stack([torch.full((4, 24, 16), float(10 * c + f)) for f in range(L)])
        chunks.append(frames)
        buf = buf.push(frames[None], torch.zeros(1, L, 7))
        hist, _, cur, _ = m.gather(buf)
        ref, ref_cur = _ctrl_world_memory(first, chunks, idx)
        assert [h[0, 0, 0].item() for h in hist[0]] == [r[0, 0, 0].item() for r in ref], c
        assert torch.equal(cur[0], ref_cur)


def test_contiguous_history_is_the_frames_before_the_current_one():
    m = tiny(history_policy="contiguous", memory=7)
    lat = torch.arange(7.0).reshape(1, 7, 1, 1, 1).expand(1, 7, 4, 24, 16)
    hist, _, cur, _ = m.gather(HistoryBuffer(lat.contiguous(), torch.zeros(1, 7, 7)))
    assert hist[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5] and cur[0, 0, 0, 0] == 6


def test_a_buffer_of_the_wrong_length_is_refused(model):
    buf = _buffer(model)
    with pytest.raises(UserError, match="world_model.memory"):
        model.gather(HistoryBuffer(buf.latents[:, -7:], buf.actions[:, -7:]))


# ---- sampler: parity with diffusers' EulerDiscreteScheduler (SVD's configuration) ------------
def test_sampler_matches_diffusers_euler_discrete_scheduler(model):
    from diffusers import EulerDiscreteScheduler
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="v_prediction", use_karras_sigmas=True,
        sigma_min=0.002, sigma_max=700.0, timestep_type="continuous",
        timestep_spacing="leading", steps_offset=1, interpolation_type="linear")
    N = model.cfg.num_steps
    sched.set_timesteps(N)
    torch.testing.assert_close(sched.sigmas.float(), model.sampler_sigmas(N), rtol=1e-4,
                               atol=1e-6)
    buf, acts = _buffer(model), torch.rand(2, 4, 7)
    noise = torch.randn(2, model.noise_frames, *model.latent_shape(),
                        generator=torch.Generator().manual_seed(3))
    hist, hist_act, cur, cur_act = model.gather(buf)
    tokens = model.tokens(hist_act, cur_act, acts)
    with torch.no_grad():
        ours = model.sample_chunk(buf, acts, noise=noise)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            v = model.network(sched.scale_model_input(x, t), t.expand(2), hist, cur, tokens)
            x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(ours, x[:, 1:], atol=2e-4, rtol=2e-4)


def test_sampling_is_reproducible_from_its_noise_and_guidance_changes_it(model):
    buf, acts = _buffer(model), torch.rand(2, 4, 7)
    noise = torch.randn(2, model.noise_frames, *model.latent_shape())
    a = model.sample_chunk(buf, acts, noise=noise)
    assert torch.equal(a, model.sample_chunk(buf, acts, noise=noise))
    guided = tiny(guidance=True)
    b = guided.sample_chunk(buf, acts, noise=noise)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_replace_mode_holds_the_current_slot_and_denoise_is_differentiable():
    m = tiny(current_slot="replace")
    assert m.noise_frames == m.future
    buf, acts = _buffer(m), torch.rand(2, 4, 7)
    out = m.sample_chunk(buf, acts, noise=torch.randn(2, 4, *m.latent_shape()))
    assert out.shape == (2, 4, *m.latent_shape())
    x = torch.randn(2, 4, *m.latent_shape())
    x0 = m.denoise(x, torch.tensor([0.5, 5.0]), buf, acts)
    x0.square().mean().backward()
    assert m.action_encoder.action_encode[0].weight.grad is not None


# ---- weights --------------------------------------------------------------------------------
def _released_layout(model) -> dict:
    """A synthetic checkpoint with the released file's key layout: our tensors plus the
    modules Ctrl-World saves and we do not build."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["image_encoder.vision_model.embeddings.class_embedding"] = torch.zeros(8)
    sd["text_encoder.text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    sd["text_encoder.text_projection.weight"] = torch.zeros(8, 8)
    return sd


def test_released_layout_loads_strictly_through_the_key_map(model, tmp_path):
    assert {k.split(".")[0] for k in model.state_dict()} == {"unet", "vae", "action_encoder"}
    path = tmp_path / "checkpoint-10000.pt"
    torch.save(_released_layout(model), path)
    fresh = tiny(current_noise_seed=1)
    torch.manual_seed(9)
    for p in fresh.parameters():
        p.data.normal_()
    load_released_checkpoint(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # built through the config, as `import-model` does
    built = build_world_model({"name": "ctrl_world", **TINY, "checkpoint": str(path)})
    assert torch.equal(built.unet.conv_in.weight, model.unet.conv_in.weight)
    assert built.config_dict()["checkpoint"] is None      # model.pt carries the weights


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("unet.conv_in.weight"), "1 missing"),
    (lambda sd: sd.__setitem__("unet.extra.weight", torch.zeros(1)), "1 unexpected"),
    (lambda sd: sd.__setitem__("action_encoder.action_encode.0.weight", torch.zeros(3, 7)),
     "another shape"),
])
def test_a_checkpoint_that_does_not_fit_names_the_keys(model, tmp_path, edit, needle):
    sd = _released_layout(model)
    edit(sd)
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    with pytest.raises(UserError, match=needle) as e:
        load_released_checkpoint(tiny(), path)
    assert str(path) in str(e.value)


def test_missing_or_corrupt_checkpoint_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(MissingFile, match="huggingface.co/yjguo/Ctrl-World"):
        load_released_checkpoint(tiny(), tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        load_released_checkpoint(tiny(), bad)
    with pytest.raises(MissingFile, match="unet/config.json"):
        build_world_model({"name": "ctrl_world", **TINY, "svd_path": str(tmp_path)})


def test_svd_folder_weights_load(model, tmp_path):
    """SVD's diffusers folder (unet/, vae/) as the start of training."""
    from diffusers import AutoencoderKLTemporalDecoder
    stock = _stock_unet_class()(**unet_kwargs(model.cfg))
    stock.load_state_dict(model.unet.state_dict())
    stock.save_pretrained(tmp_path / "unet")
    vae = AutoencoderKLTemporalDecoder.from_config(model.vae.config)
    vae.load_state_dict(model.vae.state_dict())
    vae.save_pretrained(tmp_path / "vae")
    built = build_world_model({"name": "ctrl_world", **TINY, "svd_path": str(tmp_path)})
    assert torch.equal(built.unet.conv_in.weight, model.unet.conv_in.weight)
    assert torch.equal(built.vae.decoder.conv_out.weight, model.vae.decoder.conv_out.weight)


def test_model_file_round_trip_and_import_command(model, tmp_path):
    from persistworld.world_model.importer import main as import_main
    save_world_model(model, tmp_path / "m.pt")
    back = load_world_model(tmp_path / "m.pt")
    assert type(back).__name__ == "CtrlWorldModel"
    buf, acts = _buffer(model), torch.rand(2, 4, 7)
    noise = torch.randn(2, model.noise_frames, *model.latent_shape())
    torch.testing.assert_close(back.sample_chunk(buf, acts, noise=noise),
                               model.sample_chunk(buf, acts, noise=noise))
    ckpt = tmp_path / "checkpoint-10000.pt"
    torch.save(_released_layout(model), ckpt)
    args = [f"world_model.{k}={v}" for k, v in TINY.items()]
    assert import_main([*args, f"world_model.checkpoint={ckpt}", "--out",
                        str(tmp_path / "cw.pt")]) == 0
    imported = load_world_model(tmp_path / "cw.pt")
    assert torch.equal(imported.unet.conv_in.weight, model.unet.conv_in.weight)
    with pytest.raises(UserError, match="world_model.memory"):
        import_main([*args, "world_model.memory=3", "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_yaml_is_the_one_definition_of_the_defaults():
    text = (Path(__file__).resolve().parents[1] / "persistworld" / "conf" / "world_model"
            / "ctrl_world.yaml").read_text()
    assert defaults()["history_idx"] == [0, 0, -8, -6, -4, -2] and "history_idx:" in text
    assert set(defaults()) == set(CtrlWorldConfig.__dataclass_fields__)


# ---- LoRA and post-training -------------------------------------------------------------------
def test_lora_targets_spatial_and_temporal_attention():
    from persistworld.trainers.adapters import NamedAdapters
    m = tiny()
    roles = NamedAdapters(m, ("policy", "old"), rank=2, alpha=2,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    names = [n for n, mod in m.unet.named_modules() if mod in roles.layers]
    assert any(".transformer_blocks." in n for n in names)
    assert any(".temporal_transformer_blocks." in n for n in names)
    assert any(".attn2." in n for n in names)              # cross-attention to the pose tokens
    buf, acts = _buffer(m), torch.rand(2, 4, 7)
    with roles.use("policy"):
        x0 = m.denoise(torch.randn(2, 4, *m.latent_shape()), torch.tensor([1.0, 2.0]), buf,
                       acts)
        x0.square().mean().backward()
    grads = [p.grad for n, p in m.unet.named_parameters() if "lora_B.policy" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.slow
def test_one_post_training_run_end_to_end(tiny_dataset, tmp_path):
    """A tiny Ctrl-World (64 x 64 views like the tiny dataset) post-trains with the default
    objective, checkpoints, evaluates and exports merged weights."""
    from hydra import compose, initialize_config_module
    from persistworld.trainers.post_train import post_train
    from persistworld.utils.io import read_jsonl
    base = tmp_path / "cw_base.pt"
    m = tiny(image_height=64, image_width=64, vae_block_out_channels=[32, 32, 32],
             history_idx=[0, 0, -3, -2, -2, -1], memory=12)
    save_world_model(m, base)
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_dataset}", f"base_model={base}", f"run_dir={run}",
                 "data.future=4", "seed=3", "rollout.prefix.low=0", "rollout.prefix.high=1",
                 "rollout.group_size=2", "rollout.best_of_n=1", "rollout.sampler_steps=2",
                 "trainer.steps=2", "trainer.batch_size=1", "trainer.ckpt_every=1",
                 "trainer.num_threads=1", "trainer.progress=false", "lora.rank=2",
                 "lora.alpha=2", "trainer.eval_every=0", "eval.num_chunks=1",
                 "eval.max_samples=1", "eval.num_steps=2", "eval.num_videos=0",
                 "eval.starts_per_episode=1"]
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        cfg = compose("post_train", overrides=overrides)
    post_train(cfg, overrides=overrides)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    after = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    before = m.state_dict()
    assert all(torch.equal(before[k], after[k].to(before[k].dtype))
               for k in before if k.startswith("vae."))
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype))
               for k in before if k.startswith("unet."))


def test_gpu_benchmark_runs_on_the_tiny_configuration(tmp_path):
    """benchmarks/ctrl_world_gpu.py (run on a lent GPU at full size) on the CPU, tiny."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ctrl_world_gpu.py"
    spec = importlib.util.spec_from_file_location("ctrl_world_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tiny", "--steps", "2", "--group", "2", "--micro", "1", "--rank", "2",
                    "--out", str(tmp_path / "gpu.json")])
    assert out["chunk_s"] > 0 and out["update_s"] > 0 and out["lora_M"] > 0
    assert (tmp_path / "gpu.json").exists()


# ---- text conditioning (CLIP text tokens on every pose token) --------------------------------
def write_tiny_clip(root: Path, projection_dim: int = 16) -> Path:
    """A CLIP text config and a character-level tokenizer in a folder, as clip_path expects."""
    import json
    from transformers import CLIPTextConfig, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"),
                  model_max_length=12).save_pretrained(root)
    CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                   projection_dim=projection_dim, bos_token_id=0, eos_token_id=1,
                   pad_token_id=1).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_text_tokens_condition_the_chunk_and_travel_with_the_buffer(clip_dir):
    m = tiny(text_cond=True, clip_path=str(clip_dir))
    emb = m.encode_text(["pick the blue block", "put it away"])
    assert emb.shape == (2, 32) and torch.equal(emb[:, :16], emb[:, 16:])   # tiled x2
    C, Hs, Ws = m.latent_shape()
    lat, act = torch.randn(2, C, Hs, Ws), torch.zeros(2, 7)
    a = m.start_buffer(lat, act, ["pick the blue block", "pick the blue block"])
    b = m.start_buffer(lat, act, ["pick the blue block", "put it away"])
    assert torch.equal(a.repeat_interleave(3).context[3], a.context[1])
    acts = torch.rand(2, 4, 7)
    noise = torch.randn(2, m.noise_frames, C, Hs, Ws)
    xa, xb = m.sample_chunk(a, acts, noise=noise), m.sample_chunk(b, acts, noise=noise)
    assert torch.equal(xa[0], xb[0]) and not torch.allclose(xa[1], xb[1])
    with pytest.raises(UserError, match="no task text"):
        m.sample_chunk(m.start_buffer(lat, act), acts, noise=noise)


def test_text_encoder_weights_load_from_the_checkpoint_when_text_cond(clip_dir, tmp_path):
    m = tiny(text_cond=True, clip_path=str(clip_dir))
    assert any(k.startswith("text_encoder.") for k in m.state_dict())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["image_encoder.vision_model.embeddings.class_embedding"] = torch.zeros(8)
    path = tmp_path / "checkpoint-10000.pt"
    torch.save(sd, path)
    back = tiny(text_cond=True, clip_path=str(clip_dir), checkpoint=str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the same file without text_cond loads, and says what is being ignored
    with pytest.warns(UserWarning, match="text_cond=true"):
        tiny(checkpoint=str(path))
    with pytest.raises(UserError, match="world_model.clip_path"):
        tiny(text_cond=True)
    with pytest.raises(MissingFile, match="openai/clip-vit-base-patch32"):
        tiny(text_cond=True, clip_path=str(tmp_path / "nothing"))


@pytest.mark.slow
def test_post_training_on_converted_ctrl_world_data_with_task_texts(clip_dir, tmp_path):
    """Ctrl-World's data layout -> convert-data -> a text-conditioned tiny Ctrl-World
    post-trained and evaluated on it (masks absent: eval.masked=false)."""
    from hydra import compose, initialize_config_module

    from persistworld.data.convert import convert
    from persistworld.trainers.post_train import post_train
    from persistworld.utils.io import read_jsonl
    from test_convert import write_ctrl_world
    data = convert("ctrl_world", write_ctrl_world(tmp_path / "src", n_train=3, n_val=2, T=9),
                   tmp_path / "droid", 32, 64, progress=False)     # LPIPS needs >= 31 px
    base = tmp_path / "cw.pt"
    save_world_model(tiny(text_cond=True, clip_path=str(clip_dir), image_height=32,
                          image_width=64,
                          history_idx=[0, 0, -2, -2, -1, -1], memory=8), base)
    run = tmp_path / "run"
    overrides = [f"data.root={data}", f"base_model={base}", f"run_dir={run}",
                 "data.image_height=32", "data.image_width=64", "data.future=4", "seed=1",
                 "rollout.prefix.low=0", "rollout.prefix.high=0", "rollout.group_size=2",
                 "rollout.best_of_n=1", "rollout.sampler_steps=2", "trainer.steps=2",
                 "trainer.batch_size=1", "trainer.ckpt_every=1", "trainer.num_threads=1",
                 "trainer.progress=false", "lora.rank=2", "lora.alpha=2",
                 "trainer.eval_every=0", "eval.num_chunks=1", "eval.max_samples=1",
                 "eval.num_steps=2", "eval.num_videos=0", "eval.starts_per_episode=1",
                 "eval.masked=false"]
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        cfg = compose("post_train", overrides=overrides)
    post_train(cfg, overrides=overrides)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    summary = [p for p in run.rglob("summary.json")]
    assert summary, "the final evaluation wrote no summary"
