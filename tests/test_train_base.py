"""Base training end to end on the tiny rendered dataset: the run directory, the no-op rerun,
and kill -9 + resume ending bit-identical to an uninterrupted run (CPU, same seed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from killing import kill_9_after_first_checkpoint

REPO = Path(__file__).resolve().parents[1]

# a tiny model and a short run; eval every step makes each step slow enough that the kill
# below lands between the first checkpoint and the end (evaluation never changes training)
TINY_OVERRIDES = [
    "seed=3",
    "world_model.block_out_channels=[16,32]",
    "world_model.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "world_model.attention_head_dim=8", "world_model.norm_num_groups=8",
    "world_model.action_hidden=16", "world_model.history_noise=0.05",
    "trainer.steps=10", "trainer.batch_size=2", "trainer.warmup_steps=2",
    "trainer.ckpt_every=3", "trainer.keep_checkpoints=2", "trainer.log_every=1",
    "trainer.eval_every=1", "trainer.eval_clips=2", "trainer.eval_sample_clips=1",
    "trainer.eval_sampler_steps=3", "trainer.num_threads=1", "trainer.num_workers=0",
]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        return compose("train_base", overrides=overrides)


def _overrides(data: Path, run_dir: Path, extra=()) -> list[str]:
    return [f"data.root={data}", f"run_dir={run_dir}", *TINY_OVERRIDES, *extra]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


def _rows(run_dir: Path, split: str) -> list[dict]:
    from persistworld.utils.io import read_jsonl
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory) -> Path:
    from persistworld.trainers.base import train_base
    run_dir = tmp_path_factory.mktemp("base_run") / "run"
    path = train_base(_compose(_overrides(tiny_dataset, run_dir)))
    assert path == run_dir / "model.pt"
    return run_dir


def test_run_directory_records_everything(uninterrupted):
    run = uninterrupted
    for name in ("config.yaml", "overrides.yaml", "metrics.jsonl", "status.json", "log.txt",
                 "model.pt"):
        assert (run / name).exists(), name
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 10
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000009.pt", "step_000010.pt"]             # keep_checkpoints=2
    ckpt = torch.load(run / "checkpoints" / "step_000010.pt", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "rng", "step", "data_position",
                "world_model", "config"):
        assert key in ckpt, key
    train = _rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in train)
    evals = _rows(run, "eval")
    assert [r["step"] for r in evals] == list(range(0, 11))
    assert {"val/loss", "val/psnr", "val/psnr_repeat_last"} <= set(evals[0])


def test_model_pt_loads_and_samples(uninterrupted):
    from persistworld.world_model import HistoryBuffer, load_world_model
    m = load_world_model(uninterrupted)
    assert m.cfg.block_out_channels == [16, 32] and m.cfg.history_noise == 0.05
    C, Hs, Ws = m.latent_shape()
    buf = HistoryBuffer.backfill(torch.zeros(1, C, Hs, Ws), torch.zeros(1, 7), m.history)
    out = m.sample_chunk(buf, torch.zeros(1, m.future, 7),
                         generator=torch.Generator().manual_seed(0), num_steps=2)
    assert out.shape == (1, m.future, C, Hs, Ws) and torch.isfinite(out).all()


def test_completed_run_rerun_is_a_noop(uninterrupted, tiny_dataset, capsys):
    from persistworld.trainers.base import train_base
    before = (uninterrupted / "model.pt").stat().st_mtime_ns
    n_rows = len(_rows(uninterrupted, "train"))
    train_base(_compose(_overrides(tiny_dataset, uninterrupted)))
    assert "already completed" in capsys.readouterr().out
    assert (uninterrupted / "model.pt").stat().st_mtime_ns == before
    assert len(_rows(uninterrupted, "train")) == n_rows


def test_kill_9_and_resume_is_bit_identical(uninterrupted, tiny_dataset, tmp_path):
    from persistworld.trainers.base import train_base
    run_dir = tmp_path / "killed"
    overrides = _overrides(tiny_dataset, run_dir)
    kill_9_after_first_checkpoint([sys.executable, "-m", "persistworld.trainers.base", *overrides], run_dir, timeout=120)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running" and status["step"] < 10
    assert not (run_dir / "model.pt").exists()

    train_base(_compose(overrides))                                   # resumes by itself
    assert "resuming from step" in (run_dir / "log.txt").read_text()
    a, b = _weights(uninterrupted), _weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log holds each step once, with the same losses
    la = [(r["step"], r["loss"]) for r in _rows(uninterrupted, "train")]
    lb = [(r["step"], r["loss"]) for r in _rows(run_dir, "train")]
    assert la == lb


def test_changed_model_config_does_not_resume_silently(uninterrupted, tiny_dataset, tmp_path):
    import shutil

    from persistworld.trainers.base import train_base
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "status.json").unlink()
    with pytest.raises(ValueError, match="different world_model"):
        train_base(_compose(_overrides(tiny_dataset, run_dir,
                                       ["world_model.history_noise=0.0"])))


def test_settings_are_checked_before_work(tiny_dataset, tmp_path):
    from persistworld.trainers.base import train_base
    with pytest.raises(ValueError, match="trainer.schedule"):
        train_base(_compose(_overrides(tiny_dataset, tmp_path / "a", ["trainer.schedule=step"])))
    with pytest.raises(ValueError, match="history"):
        train_base(_compose(_overrides(tiny_dataset, tmp_path / "b", ["world_model.history=4"])))
    with pytest.raises(Exception, match="persistworld render"):
        train_base(_compose(_overrides(tmp_path / "no_data", tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_init_from_starts_a_new_run_from_given_weights(uninterrupted, tiny_dataset, tmp_path):
    from persistworld.errors import UserError
    from persistworld.trainers.base import train_base
    with pytest.raises(UserError, match="trainer.init_from"):
        train_base(_compose(_overrides(tiny_dataset, tmp_path / "x",
                                       [f"trainer.init_from={tmp_path / 'none.pt'}"])))
    assert not (tmp_path / "x").exists()
    # one step at a negligible learning rate: the weights are the source's, not a fresh init
    run = tmp_path / "ft"
    train_base(_compose(_overrides(tiny_dataset, run, [
        f"trainer.init_from={uninterrupted}", "trainer.steps=1", "trainer.lr=1e-12",
        "trainer.warmup_steps=0", "world_model.history_noise=0.3"])))
    src, got = _weights(uninterrupted), _weights(run)
    assert all(torch.allclose(src[k], got[k], atol=1e-6) for k in src)
    assert "weights initialised from" in (run / "log.txt").read_text()
    with pytest.raises(UserError, match="another architecture"):
        train_base(_compose(_overrides(tiny_dataset, tmp_path / "arch", [
            f"trainer.init_from={uninterrupted}", "world_model.block_out_channels=[32,32]"])))


def test_init_from_may_add_pose_maps(uninterrupted, tiny_dataset, tmp_path):
    """trainer.init_from a model without pose maps into world_model.pose_maps=true: the
    cameras come from the dataset into the run's config and model file, the source weights
    fill the old input channels and the new ones start at zero (lr ~ 0 keeps them there)."""
    from persistworld.trainers.base import train_base
    from persistworld.world_model import load_world_model
    run = tmp_path / "maps"
    train_base(_compose(_overrides(tiny_dataset, run, [
        f"trainer.init_from={uninterrupted}", "trainer.steps=1", "trainer.lr=1e-12",
        "trainer.warmup_steps=0", "world_model.pose_maps=true"])))
    src, got = _weights(uninterrupted), _weights(run)
    for k in ("unet.conv_in.weight", "head.inp.weight"):
        n = src[k].shape[1]
        assert got[k].shape[1] > n
        assert torch.allclose(got[k][:, :n], src[k], atol=1e-6)
        assert float(got[k][:, n:].abs().max()) < 1e-6
    assert all(torch.allclose(src[k], got[k], atol=1e-6) for k in src if src[k].shape ==
               got[k].shape)
    assert "zero-initialised or new modules: unet.conv_in.weight, head.inp.weight" in \
        (run / "log.txt").read_text()
    model = load_world_model(run)
    assert len(model.cfg.pose_map_cameras[0]) == 16 and model.cfg.pose_map_cameras[2] == []
    assert "pose_map_cameras" in (run / "config.yaml").read_text()



def test_init_from_may_add_silhouettes(uninterrupted, tiny_dataset, tmp_path):
    """trainer.init_from a model without silhouettes into world_model.silhouettes=true: the
    source's weights are kept (new input channels at zero), the decoder is a new module with
    its own learning rate (trainer.aux_lr_scale) trained on the class masks beside the
    denoising loss, which the train and eval rows log separately; a scale <= 0 fails first."""
    from persistworld.errors import UserError
    from persistworld.trainers.base import train_base
    from persistworld.world_model import load_world_model
    for bad, needle in ((["trainer.aux_lr_scale=0"], "trainer.aux_lr_scale"),
                        (["trainer.aux_warmup_steps=1"], "has none"),
                        (["trainer.aux_warmup_steps=9", "trainer.steps=9",
                          "world_model.silhouettes=true"], "trainer.aux_warmup_steps")):
        with pytest.raises(UserError, match=needle):
            train_base(_compose(_overrides(tiny_dataset, tmp_path / "bad", bad)))
        assert not (tmp_path / "bad").exists()
    run = tmp_path / "sil"
    train_base(_compose(_overrides(tiny_dataset, run, [
        f"trainer.init_from={uninterrupted}", "trainer.steps=3", "trainer.lr=1e-12",
        "trainer.aux_lr_scale=1e10", "trainer.warmup_steps=0", "trainer.eval_every=3",
        "trainer.aux_warmup_steps=1", "world_model.silhouettes=true",
        "world_model.silhouette_hidden=16"])))
    src, got = _weights(uninterrupted), _weights(run)
    assert all(torch.allclose(src[k], got[k], atol=1e-6) for k in src
               if src[k].shape == got[k].shape)
    assert float(got["unet.conv_in.weight"][:, src["unet.conv_in.weight"].shape[1]:].abs()
                 .max()) < 1e-6
    assert "silhouettes (new module)" in (run / "log.txt").read_text()
    train = _rows(run, "train")
    assert "loss" not in train[0] and "loss" in train[1]     # S0: the decoder alone first
    assert all(r["aux/silhouette"] > 0 for r in train)
    assert train[1]["aux/silhouette"] < train[0]["aux/silhouette"]   # only the decoder moved
    assert all("val/silhouette" in r for r in _rows(run, "eval"))
    fresh = load_world_model(run)
    assert fresh.cfg.silhouettes and fresh.auxiliary_modules()



def test_init_from_may_add_the_output_gate(uninterrupted, tiny_dataset, tmp_path):
    """trainer.init_from a model without the gate into world_model.output_gate=true: every
    source weight is kept and the FrameHead's gate is a new module at its initialisation."""
    from persistworld.trainers.base import train_base
    run = tmp_path / "gate"
    train_base(_compose(_overrides(tiny_dataset, run, [
        f"trainer.init_from={uninterrupted}", "trainer.steps=1", "trainer.lr=1e-12",
        "trainer.warmup_steps=0", "world_model.output_gate=true"])))
    src, got = _weights(uninterrupted), _weights(run)
    assert set(got) - set(src) == {"head.gate.conv.weight", "head.gate.conv.bias"}
    assert all(torch.allclose(src[k], got[k], atol=1e-6) for k in src)
    from persistworld.world_model.embedded import OutputGate
    assert abs(float(got["head.gate.conv.bias"]) * OutputGate.gain - 2.0) < 1e-6
    assert "head.gate (new module)" in (run / "log.txt").read_text()

def test_motion_weight_reweights_the_loss(uninterrupted, tiny_dataset, tmp_path):
    """trainer.motion_weight > 0 weighs the arm's and the object's cells (class masks) more:
    the same first batch, noise and weights give another loss; negative values fail first."""
    from persistworld.errors import UserError
    from persistworld.trainers.base import train_base
    with pytest.raises(UserError, match="trainer.motion_weight"):
        train_base(_compose(_overrides(tiny_dataset, tmp_path / "bad",
                                       ["trainer.motion_weight=-1"])))
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "mw"
    train_base(_compose(_overrides(tiny_dataset, run, ["trainer.steps=1",
                                                       "trainer.motion_weight=4"])))
    plain, weighted = _rows(uninterrupted, "train")[0], _rows(run, "train")[0]
    assert plain["step"] == weighted["step"] == 1
    assert weighted["mse"] == pytest.approx(plain["mse"], rel=1e-6)    # same prediction
    assert weighted["loss"] != pytest.approx(plain["loss"], rel=1e-3)


def test_lr_schedule_and_step_batches():
    from persistworld.trainers.base import lr_factor, step_indices
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, "constant") == 1.0
    assert step_indices(1000, 8, 0, 5) == step_indices(1000, 8, 0, 5)
    assert step_indices(1000, 8, 0, 5) != step_indices(1000, 8, 0, 6)
