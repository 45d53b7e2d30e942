"""PersistWorld post-training on a tiny base model: settings checked before work, the run
directory, frozen weights, batched branching, logging, final evaluation, and kill -9 + resume
ending with the same weights as an uninterrupted run (CPU, same seed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killing import kill_9_after_first_checkpoint

from test_train_base import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

TINY_POST = [
    "seed=5", "rollout.prefix.low=0", "rollout.prefix.high=2", "rollout.group_size=4",
    "rollout.best_of_n=1", "rollout.sampler_steps=3", "trainer.steps=6", "trainer.batch_size=2",
    "trainer.ckpt_every=2", "trainer.num_threads=1", "trainer.progress=false", "lora.rank=4",
    "lora.alpha=4", "optim.lr=1e-3", "trainer.eval_every=3", "trainer.eval_chunks=1",
    "trainer.eval_samples=2", "eval.num_chunks=2", "eval.max_samples=2", "eval.num_steps=3",
    "eval.num_videos=1", "eval.starts_per_episode=2",
]


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_module
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


def _post_overrides(data: Path, base: Path, run_dir: Path, extra=()) -> list[str]:
    return [f"data.root={data}", f"base_model={base}", f"run_dir={run_dir}", *TINY_POST, *extra]


def _weights(path: Path) -> dict:
    return torch.load(path / "model.pt", weights_only=False)["state_dict"]


def _rows(run_dir: Path, split: str) -> list[dict]:
    from persistworld.utils.io import read_jsonl
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def base_model(tiny_dataset, tmp_path_factory) -> Path:
    from persistworld.trainers.base import train_base
    run_dir = tmp_path_factory.mktemp("post_base") / "base"
    overrides = [f"data.root={tiny_dataset}", f"run_dir={run_dir}", *TINY_OVERRIDES,
                 "trainer.eval_every=0"]
    train_base(_compose("train_base", overrides))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, base_model, tmp_path_factory) -> Path:
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path_factory.mktemp("post_run") / "run"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir)
    post_train(_compose("post_train", overrides), overrides=overrides)
    return run_dir


# ---- settings fail before any work ---------------------------------------------------------
@pytest.mark.parametrize("override,setting", [
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.best_of_n=3", "rollout.best_of_n"),
    ("rollout.prefix.strategy=random", "rollout.prefix.strategy"),
    ("rollout.sampling_policy=ema", "rollout.sampling_policy"),
    ("objective.sigma=uniform", "objective.sigma"),
    ("objective.beta=0", "objective.beta"),
    ("reward.w_lpips=0", "reward"),
    ("policy_ema.decay=1.0", "policy_ema.decay"),
    ("old_policy.schedule=cosine", "old_policy"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("rollout.sampler_steps=0", "rollout.sampler_steps"),      # was: silently 50 steps
    ("eval.num_chunks=0", "eval.num_chunks"),                  # was: trained, then failed
    ("trainer.ckpt_every=0", "trainer.ckpt_every"),            # was: crash after step 1
    ("trainer.micro_batch=0", "trainer.micro_batch"),
    ("eval.split=holdout", "eval.split"),
    ("eval.num_steps=0", "eval.num_steps"),
    ("rollout.start_pool_chunks=2", "rollout.start_pool_chunks"),   # < max prefix 2 + F 1
    ("reward.adv_norm=global", "reward.adv_norm"),
])
def test_impossible_settings_name_the_setting(tiny_dataset, base_model, tmp_path, override,
                                              setting):
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path / "run"
    extra = [override]
    if override == "reward.w_lpips=0":
        extra += ["reward.w_ssim=0", "reward.w_psnr=0"]
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, extra)
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        post_train(_compose("post_train", overrides), overrides=overrides)
    assert not run_dir.exists(), "a rejected config must not leave a run directory"


def test_prefix_longer_than_episodes_is_rejected(tiny_dataset, base_model, tmp_path):
    from persistworld.trainers.post_train import post_train
    overrides = _post_overrides(tiny_dataset, base_model, tmp_path / "run",
                                ["rollout.prefix.high=9"])
    with pytest.raises(ValueError, match="rollout.prefix.high"):
        post_train(_compose("post_train", overrides), overrides=overrides)


def test_lora_targets_that_match_nothing_are_rejected(tiny_dataset, base_model, tmp_path):
    from persistworld.trainers.post_train import post_train
    overrides = _post_overrides(tiny_dataset, base_model, tmp_path / "run",
                                ["lora.target_modules=[nonexistent_proj]"])
    with pytest.raises(ValueError, match="lora.target_modules"):
        post_train(_compose("post_train", overrides), overrides=overrides)


# ---- the run ------------------------------------------------------------------------------
def test_run_directory_and_logging(uninterrupted):
    run = uninterrupted
    for name in ("config.yaml", "overrides.yaml", "metrics.jsonl", "status.json", "model.pt"):
        assert (run / name).exists(), name
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert "rollout.group_size=4" in json.loads((run / "overrides.yaml").read_text())
    train = _rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    needed = {"loss", "loss/pos", "loss/neg", "loss/kl", "old_deviation", "grad_norm",
              "reward/mean", "reward/std", "adv/abs_mean", "kept_frac", "old_decay",
              "time/prefix", "time/branch", "time/reward", "time/update",
              "reward/lpips/external", "reward/ssim/wrist", "reward_std/psnr/external"}
    assert needed <= set(train[0]), needed - set(train[0])
    assert all(r["kept_frac"] == pytest.approx(0.5) for r in train)   # best-of-1 of K=4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    checks = _rows(run, "eval")
    assert [r["step"] for r in checks] == [3, 6]
    assert {"val/external/lpips", "val/wrist/ssim"} <= set(checks[0])
    summary = json.loads((run / "eval" / "autoregressive_2" / "summary.json").read_text())
    assert summary["num_samples"] == 2 and 0 < summary["metrics"]["external"]["lpips"] < 1
    assert list((run / "eval" / "autoregressive_2" / "videos").glob("*.gif"))
    ckpt = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    for key in ("policy", "old", "optimizer", "rng"):
        assert ckpt[key], key
    assert ckpt["step"] == 6 and ckpt["ema"] is None          # policy EMA is off by default
    assert set(ckpt["policy"]) == set(ckpt["old"])


def test_only_adapters_and_action_encoder_change(uninterrupted, base_model):
    """Everything but the LoRA-targeted attention projections and the action encoder stays
    bit-identical to the base model; the targeted ones and the action encoder do change."""
    base, post = _weights(base_model), _weights(uninterrupted)
    assert base.keys() == post.keys()
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    changed = {k for k in base if not torch.equal(base[k], post[k])}
    assert changed, "post-training changed nothing"
    allowed = {k for k in base if k.endswith(targets) or k.startswith("action_encoder.")}
    assert changed <= allowed, sorted(changed - allowed)[:5]
    assert any(k.startswith("action_encoder.") for k in changed)
    assert any(k.endswith(targets) for k in changed)


def test_completed_run_rerun_is_a_noop(uninterrupted, tiny_dataset, base_model, capsys):
    from persistworld.trainers.post_train import post_train
    before = (uninterrupted / "model.pt").stat().st_mtime_ns
    overrides = _post_overrides(tiny_dataset, base_model, uninterrupted)
    post_train(_compose("post_train", overrides), overrides=overrides)
    assert "already completed" in capsys.readouterr().out
    assert (uninterrupted / "model.pt").stat().st_mtime_ns == before


def test_kill_9_and_resume_gives_the_same_weights(uninterrupted, tiny_dataset, base_model,
                                                  tmp_path):
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path / "killed"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir)
    kill_9_after_first_checkpoint([sys.executable, "-m", "persistworld.cli", "post-train", *overrides], run_dir, timeout=180)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running" and status["step"] < 6
    assert not (run_dir / "model.pt").exists()

    post_train(_compose("post_train", overrides), overrides=overrides)      # resumes by itself
    a, b = _weights(uninterrupted), _weights(run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [(r["step"], r["loss"], r["reward/mean"], r["samples"])
          for r in _rows(uninterrupted, "train")]
    lb = [(r["step"], r["loss"], r["reward/mean"], r["samples"]) for r in _rows(run_dir, "train")]
    assert la == lb
    assert [r[3] for r in la] == [2 * r[0] for r in la]          # 2 prefixes per step


def test_checkpoints_carry_the_samples_seen_and_older_ones_still_resume(uninterrupted,
                                                                        tiny_dataset,
                                                                        base_model, tmp_path):
    """Progress: every checkpoint holds the samples seen; one written before that count
    (no "samples" key) resumes as step x trainer.batch_size and ends as the uninterrupted run."""
    import shutil

    from persistworld.trainers.post_train import post_train
    ckpts = sorted((uninterrupted / "checkpoints").glob("*.pt"))
    first = torch.load(ckpts[0], weights_only=False)
    assert first["samples"] == 2 * first["step"]
    run_dir = tmp_path / "older"
    shutil.copytree(uninterrupted, run_dir)
    for p in sorted((run_dir / "checkpoints").glob("*.pt"))[1:]:
        p.unlink()
    old = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[0], weights_only=False)
    del old["samples"]
    torch.save(old, sorted((run_dir / "checkpoints").glob("*.pt"))[0])
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "step": old["step"]}))
    (run_dir / "model.pt").unlink()
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    overrides = _post_overrides(tiny_dataset, base_model, run_dir)
    post_train(_compose("post_train", overrides), overrides=overrides)
    a, b = _weights(uninterrupted), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["samples"] for r in _rows(run_dir, "train")] == \
        [r["samples"] for r in _rows(uninterrupted, "train")]


def test_resume_with_different_settings_is_refused(uninterrupted, tiny_dataset, base_model,
                                                   tmp_path):
    import shutil

    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "step": 4}))
    (run_dir / "model.pt").unlink()
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, ["objective.beta=0.5"])
    with pytest.raises(ValueError, match="objective.beta"):
        post_train(_compose("post_train", overrides), overrides=overrides)


# ---- run identity: a relaunch never continues or reports another run ----------------------
def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def _post(overrides):
    from persistworld.trainers.post_train import post_train
    return post_train(_compose("post_train", overrides), overrides=overrides)


def test_fingerprint_is_recorded_with_the_code_version(uninterrupted):
    ident = json.loads((uninterrupted / "fingerprint.json").read_text())
    assert set(ident["parts"]) == {"config", "base_model", "data"} and ident["steps"] == 6
    assert "trainer" in ident["settings"] and "steps" not in ident["settings"]["trainer"]
    assert "run_dir" not in ident["settings"] and "eval" not in ident["settings"]
    status = json.loads((uninterrupted / "status.json").read_text())
    assert status["fingerprint"] == ident["fingerprint"][:16] and status["code"] == ident["code"]


def test_in_training_checks_do_not_change_the_trained_weights(uninterrupted, tiny_dataset,
                                                              base_model, tmp_path):
    """trainer.eval_every is left out of the fingerprint (utils/fingerprint.py NEUTRAL): a run
    without in-training checks must end with the same weights as one with them."""
    unchecked = tmp_path / "unchecked"
    _post(_post_overrides(tiny_dataset, base_model, unchecked, ["trainer.eval_every=0"]))
    assert _rows(uninterrupted, "eval") and not _rows(unchecked, "eval")
    a, b = _weights(uninterrupted), _weights(unchecked)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_more_steps_extend_a_completed_run_exactly(uninterrupted, tiny_dataset, base_model,
                                                   tmp_path):
    extended = _copy_run(uninterrupted, tmp_path / "extended")
    old_eval = json.loads((extended / "eval" / "autoregressive_2" / "summary.json").read_text())
    _post(_post_overrides(tiny_dataset, base_model, extended, ["trainer.steps=8"]))
    fresh = tmp_path / "fresh"
    _post(_post_overrides(tiny_dataset, base_model, fresh, ["trainer.steps=8"]))
    status = json.loads((extended / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 8
    a, b = _weights(extended), _weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)            # = an 8-step run from scratch
    assert [r["step"] for r in _rows(extended, "train")] == list(range(1, 9))
    new_eval = json.loads((extended / "eval" / "autoregressive_2" / "summary.json").read_text())
    assert new_eval["metrics"] != old_eval["metrics"]          # the 6-step numbers are gone
    assert new_eval["metrics"] == json.loads(
        (fresh / "eval" / "autoregressive_2" / "summary.json").read_text())["metrics"]


def test_fewer_steps_than_trained_are_refused(uninterrupted, tiny_dataset, base_model, tmp_path):
    from persistworld.trainers.post_train import StaleRun
    run = _copy_run(uninterrupted, tmp_path / "run")
    with pytest.raises(StaleRun, match="trained 6 steps but trainer.steps=4"):
        _post(_post_overrides(tiny_dataset, base_model, run, ["trainer.steps=4"]))


def test_another_base_model_file_is_refused_the_same_one_elsewhere_is_not(
        uninterrupted, tiny_dataset, base_model, tmp_path, capsys):
    import shutil

    from persistworld.trainers.post_train import StaleRun
    run = _copy_run(uninterrupted, tmp_path / "run")
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(base_model / "model.pt", moved)                 # same bytes, another path
    _post(_post_overrides(tiny_dataset, moved, run))
    assert "already completed" in capsys.readouterr().out
    blob = torch.load(moved, weights_only=False)
    k = next(iter(blob["state_dict"]))
    blob["state_dict"][k] = blob["state_dict"][k] + 1e-3        # another base model
    torch.save(blob, moved)
    with pytest.raises(StaleRun, match=r"base model file \(content\)"):
        _post(_post_overrides(tiny_dataset, moved, run))


def test_another_dataset_is_refused_the_same_one_elsewhere_is_not(
        uninterrupted, tiny_dataset, base_model, tmp_path, capsys):
    import shutil

    from persistworld.trainers.post_train import StaleRun
    run = _copy_run(uninterrupted, tmp_path / "run")
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    _post(_post_overrides(data, base_model, run))
    assert "already completed" in capsys.readouterr().out
    manifest = json.loads((data / "manifest.json").read_text())
    train = next(e for e in manifest["episodes"] if e["split"] == "train")
    train["sha256"] = "0" * 64                                  # a re-rendered episode
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleRun, match="dataset"):
        _post(_post_overrides(data, base_model, run))


def test_changed_eval_settings_re_evaluate_only(uninterrupted, tiny_dataset, base_model,
                                                tmp_path):
    run = _copy_run(uninterrupted, tmp_path / "run")
    model_mtime = (run / "model.pt").stat().st_mtime_ns
    _post(_post_overrides(tiny_dataset, base_model, run, ["eval.max_samples=1"]))
    summary = json.loads((run / "eval" / "autoregressive_2" / "summary.json").read_text())
    assert summary["settings"]["max_samples"] == 1 and summary["num_samples"] == 1
    assert summary["split"] == "test" and summary["data"]["split"] == "test"
    assert (run / "model.pt").stat().st_mtime_ns == model_mtime   # not retrained, not rewritten
    assert json.loads((run / "status.json").read_text())["step"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_a_code_change_alone_is_recorded_not_refused(uninterrupted, tiny_dataset, base_model,
                                                     tmp_path):
    run = _copy_run(uninterrupted, tmp_path / "run")
    ident = json.loads((run / "fingerprint.json").read_text())
    ident["code"] = "0123456789ab"                               # the run began on other code
    (run / "fingerprint.json").write_text(json.dumps(ident))
    _post(_post_overrides(tiny_dataset, base_model, run, ["trainer.steps=7"]))
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 7
    assert status["code_history"][0] == "0123456789ab"
    assert "code changed since the run started" in (run / "log.txt").read_text()


# ---- branching ----------------------------------------------------------------------------
def test_branching_is_batched_and_each_candidate_reproducible(base_model, tiny_dataset):
    """S2 makes one network call per denoising step for all B*K candidates, and each candidate
    equals the same candidate generated alone from its seed."""
    from persistworld.data.dataset import RolloutDataset
    from persistworld.rollout.branching import branch
    from persistworld.world_model import HistoryBuffer, load_world_model
    model = load_world_model(base_model)
    item = RolloutDataset(tiny_dataset, "train", 2, 5, 1, starts_per_episode=1)[0]
    start = model.encode(item["start_frame"][None, None])[:, 0]
    buf = HistoryBuffer.backfill(start, item["start_action"][None], model.history)
    buf = HistoryBuffer(buf.latents.repeat(2, 1, 1, 1, 1), buf.actions.repeat(2, 1, 1))
    acts = item["actions"][None, :10].repeat(2, 1, 1)
    calls = []
    inner = model.network
    model.network = lambda *a, **k: (calls.append(a[0].shape[0]), inner(*a, **k))[1]
    out = branch(model, buf, acts, group_size=3, branch_chunks=2, seeds=[11, 12], num_steps=3)
    assert calls == [6] * 6                                 # 2 chunks x 3 steps, all 6 at once
    assert out.clip().shape[:2] == (6, 10)
    alone = branch(model, HistoryBuffer(buf.latents[1:], buf.actions[1:]), acts[1:],
                   group_size=3, branch_chunks=2, seeds=[12], num_steps=3)
    torch.testing.assert_close(alone.clip(), out.clip()[3:], atol=1e-5, rtol=1e-5)
    candidates = out.clip()
    assert not torch.allclose(candidates[3], candidates[4])  # candidates differ by their seed


def test_bf16_autocast_runs_and_keeps_float32_state(tiny_dataset, base_model, tmp_path):
    """trainer.precision=bf16 (meant for GPUs; CPU autocast exercises the same code): a step
    runs, the saved weights and the logged losses stay float32 and finite."""
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path / "bf16"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir,
                                ["trainer.precision=bf16", "trainer.steps=2",
                                 "trainer.eval_every=0", "eval.enabled=false"])
    post_train(_compose("post_train", overrides), overrides=overrides)
    rows = _rows(run_dir, "train")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # autocast really ran: the same two steps in float32 give other losses
    fp32 = tmp_path / "fp32"
    overrides = _post_overrides(tiny_dataset, base_model, fp32,
                                ["trainer.steps=2", "trainer.eval_every=0", "eval.enabled=false"])
    post_train(_compose("post_train", overrides), overrides=overrides)
    assert [r["loss"] for r in rows] != [r["loss"] for r in _rows(fp32, "train")]


# ---- the CLI: user errors are one line and exit 2, bugs keep their traceback ---------------
@pytest.mark.parametrize("args,needle", [
    (["trainer.stepz=3"], "Key 'stepz' not in 'TrainerConf'"),       # was: 7 lines, exit 1
    (["experiment=nope"], "available: bench, mini, paper"),
    (["rollout.sampler_steps=0"], "rollout.sampler_steps must be >= 1"),
    (["trainer.ckpt_every=0"], "trainer.ckpt_every must be >= 1"),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, args, needle):
    out = subprocess.run([sys.executable, "-m", "persistworld.cli", "post-train",
                          f"run_dir={tmp_path / 'run'}", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "pybullet" not in ln]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


def test_internal_errors_keep_their_traceback():
    from persistworld.cli import _guarded
    from persistworld.errors import UserError

    def bug(cfg):
        raise ValueError("an internal bug, not the user's setting")

    def user(cfg):
        raise UserError("trainer.steps must be >= 1")

    with pytest.raises(ValueError, match="internal bug"):
        _guarded(bug)(None)                   # propagates: Hydra prints the traceback
    with pytest.raises(SystemExit) as e:
        _guarded(user)(None)
    assert e.value.code == 2


def test_base_model_frames_must_match_the_data(tiny_dataset, base_model, tmp_path):
    """A base model trained for other H / L than data.history / data.future is refused with
    one message naming both, before any step."""
    from persistworld.errors import UserError
    from persistworld.trainers.post_train import post_train
    run_dir = tmp_path / "mismatch"
    overrides = _post_overrides(tiny_dataset, base_model, run_dir, ["data.history=4"])
    with pytest.raises(UserError, match="data.history / data.future"):
        post_train(_compose("post_train", overrides), overrides=overrides)
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_base_model_with_silhouettes_post_trains_with_its_decoder_frozen(
        tiny_dataset, base_model, tmp_path):
    """world_model.silhouettes: the decoder is part of the frozen backbone in post-training
    (its weights stay bit-identical), while LoRA and the action encoder train."""
    from persistworld.trainers.base import train_base
    from persistworld.trainers.post_train import post_train
    base = tmp_path / "sil_base"
    train_base(_compose("train_base", [
        f"data.root={tiny_dataset}", f"run_dir={base}", *TINY_OVERRIDES,
        "trainer.eval_every=0", f"trainer.init_from={base_model}", "trainer.steps=1",
        "world_model.silhouettes=true", "world_model.silhouette_hidden=16"]))
    run = tmp_path / "post"
    overrides = _post_overrides(tiny_dataset, base, run, ["trainer.steps=2",
                                                         "trainer.eval_every=0"])
    post_train(_compose("post_train", overrides), overrides=overrides)
    b, p = _weights(base), _weights(run)
    sil = [k for k in b if k.startswith("silhouettes.")]
    assert sil and all(torch.equal(b[k], p[k]) for k in sil)
    assert any(not torch.equal(b[k], p[k]) for k in b if k.startswith("action_encoder."))
