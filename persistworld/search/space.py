"""Search spaces for `persistworld search` (sweeps/optuna/*.yaml), and their validation.

A space file (see sweeps/optuna/mini.yaml for a commented example)::

    name: mini                      # the Optuna study name
    n_trials: 24                    # total trials, shared by all workers
    base_overrides: [trainer.steps=50, trainer.eval_every=10]   # post-train Hydra overrides
    objectives:                     # one (single-objective) or several (multi-objective)
      - {metric: external/lpips, direction: minimize}
      - {metric: wrist/ssim, direction: maximize}
    params:                         # config key -> distribution
      optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      rollout.group_size: {type: categorical, choices: [4, 8]}
      rollout.prefix.high: {type: int, low: 1, high: 4}
    sampler: {name: tpe, seed: 0}   # tpe | random | nsgaii | qmc | gp | cmaes (+ its kwargs)
    pruner: {name: median, n_startup_trials: 2}   # none | median | percentile | threshold
                                                  # | successive_halving | hyperband (+ kwargs)
    workers: 2                      # default for --workers
    launcher: local                 # default for --launcher (local | slurm)
    failures: {heartbeat_interval: 10, grace_period: 60, max_retry: 1}
    slurm: {slurm_partition: debug, timeout_min: 60, cpus_per_task: 1}  # submitit parameters

An objective's ``metric`` is a path inside the final evaluation's ``summary.json``
``metrics`` (``<group>/<metric>``, or ``<mask>/<group>/<metric>``); pruning reads the same
path from the run's in-training ``eval`` rows (``val/<metric>`` in metrics.jsonl).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from persistworld.data.dataset import SELECTION_SPLIT
from persistworld.errors import UserError

GROUPS = ("external", "wrist")
METRICS = ("ssim", "psnr", "lpips")
MASKS = ("object", "robot")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random", "nsgaii", "qmc", "gp", "cmaes")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "threshold")
LAUNCHERS = ("local", "slurm")
# keys a search must not set: they are the driver's (run_dir) or the environment's
RESERVED = ("run_dir", "eval.split")
# a search chooses settings, so its objectives and pruning read the selection split (val);
# the chosen settings are then reported on test by a separate run (search-report's best.yaml)
SEARCH_OVERRIDES = (f"eval.split={SELECTION_SPLIT}",)


class SpaceError(UserError):
    """A search space that cannot run; the message names the file and the setting."""


@dataclass(frozen=True)
class Objective:
    metric: str            # e.g. "external/lpips"
    direction: str         # minimize | maximize

    @property
    def eval_key(self) -> str:
        """The key of this metric in metrics.jsonl's in-training "eval" rows."""
        return f"val/{self.metric}"

    def final_value(self, summary: dict) -> float:
        node: Any = summary["metrics"]
        for part in self.metric.split("/"):
            node = node[part]
        return float(node)


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def distribution(self):
        import optuna.distributions as d
        if self.type == "float":
            return d.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.choices))

    def extremes(self) -> list:
        """Values to validate before the search: the bounds, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]


@dataclass(frozen=True)
class Failures:
    heartbeat_interval: int = 10     # s between a running trial's heartbeats
    grace_period: int = 60           # s without heartbeat before a trial counts as dead
    max_retry: int = 1               # retries of a dead worker's trial; 0 = skip (leave FAIL)
    wait_for_running: bool = True    # an idle worker waits while others' trials run (one may
                                     # die and be retried); false: it exits (a relaunch retries)


@dataclass
class SearchSpace:
    path: Path
    name: str
    n_trials: int
    objectives: list[Objective]
    params: dict[str, Param]
    base_overrides: list[str] = field(default_factory=list)
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "none"})
    workers: int = 1
    launcher: str = "local"
    failures: Failures = field(default_factory=Failures)
    slurm: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def pruning(self) -> bool:
        return self.pruner.get("name", "none") != "none"

    # -- optuna objects ------------------------------------------------------------------
    def make_sampler(self, seed_offset: int = 0):
        import optuna
        kw = {k: v for k, v in self.sampler.items() if k != "name"}
        if kw.get("seed") is not None:
            kw["seed"] = int(kw["seed"]) + seed_offset
        name = self.sampler.get("name", "tpe")
        cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "nsgaii": optuna.samplers.NSGAIISampler, "qmc": optuna.samplers.QMCSampler,
               "gp": optuna.samplers.GPSampler, "cmaes": optuna.samplers.CmaEsSampler}[name]
        return cls(**kw)

    def make_pruner(self):
        import optuna
        kw = {k: v for k, v in self.pruner.items() if k != "name"}
        name = self.pruner.get("name", "none")
        cls = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "percentile": optuna.pruners.PercentilePruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner,
               "threshold": optuna.pruners.ThresholdPruner}[name]
        return cls(**kw)

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's parameters (a retried trial gets back its fixed values)."""
        out = {}
        for k, p in self.params.items():
            if p.type == "float":
                out[k] = trial.suggest_float(k, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                out[k] = trial.suggest_int(k, p.low, p.high, log=p.log, step=int(p.step or 1))
            else:
                out[k] = trial.suggest_categorical(k, list(p.choices))
        return out

    def overrides(self, params: dict[str, Any]) -> list[str]:
        return [to_override(k, v) for k, v in params.items()]


# -- reading the file ------------------------------------------------------------------------
def _fail(path: Path, where: str, msg: str) -> SpaceError:
    return SpaceError(f"search space {path}: {where}: {msg}")


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"params.{key}"
    if not isinstance(spec, dict):
        raise _fail(path, where, "must be a mapping like {type: float, low: .., high: ..}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise _fail(path, where, f"unknown field(s) {sorted(unknown)}")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in PARAM_TYPES:
        raise _fail(path, where, f"type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(path, where, "categorical needs a non-empty list `choices`")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise _fail(path, where, f"choice {c!r} is not a scalar (null, bool, number, "
                            f"string)")
        return Param(key, kind, choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise _fail(path, where, f"{kind} needs numeric `low` and `high`") from None
    if not low <= high:
        raise _fail(path, where, f"low={spec['low']} must be <= high={spec['high']}")
    log = bool(spec.get("log", False))
    if log and spec.get("step") is not None:
        raise _fail(path, where, "log=true and step cannot be combined")
    if log and low <= 0:
        raise _fail(path, where, f"log=true needs low > 0, got {spec['low']}")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise _fail(path, where, "int bounds must be integers")
        return Param(key, kind, int(low), int(high), log, spec.get("step"))
    return Param(key, kind, low, high, log, spec.get("step"))


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file's own structure (the config keys are checked by
    ``validate_space``)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpaceError(f"search space {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {path} must be a mapping")
    known = {"name", "n_trials", "objectives", "params", "base_overrides", "sampler", "pruner",
             "workers", "launcher", "failures", "slurm", "description"}
    if set(raw) - known:
        raise _fail(path, "top level", f"unknown key(s) {sorted(set(raw) - known)} "
                    f"(known: {', '.join(sorted(known))})")
    objectives = raw.get("objectives")
    if isinstance(objectives, dict):
        objectives = [objectives]
    if not objectives or not isinstance(objectives, list):
        raise _fail(path, "objectives", "needs at least one {metric: .., direction: ..}")
    objs = []
    for i, o in enumerate(objectives):
        where = f"objectives[{i}]"
        if not isinstance(o, dict) or "metric" not in o:
            raise _fail(path, where, "must be {metric: <group>/<metric>, direction: ..}")
        parts = str(o["metric"]).split("/")
        ok = (len(parts) == 2 and parts[0] in GROUPS and parts[1] in METRICS) or (
            len(parts) == 3 and parts[0] in MASKS and parts[1] in GROUPS and parts[2] in METRICS)
        if not ok:
            raise _fail(path, where, f"metric {o['metric']!r} is not <group>/<metric> or "
                        f"<mask>/<group>/<metric> with group in {GROUPS}, metric in {METRICS}, "
                        f"mask in {MASKS}")
        d = o.get("direction", "minimize" if parts[-1] == "lpips" else "maximize")
        if d not in DIRECTIONS:
            raise _fail(path, where, f"direction must be minimize or maximize, got {d!r}")
        objs.append(Objective(str(o["metric"]), d))
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise _fail(path, "params", "needs at least one parameter")
    params = {}
    for k, spec in params_raw.items():
        if k in RESERVED:
            raise _fail(path, f"params.{k}", "is set by the search driver")
        params[str(k)] = _param(path, str(k), spec)
    base = raw.get("base_overrides") or []
    if not isinstance(base, list) or not all(isinstance(b, str) and "=" in b for b in base):
        raise _fail(path, "base_overrides", "must be a list of `key=value` Hydra overrides")
    clash = [b for b in base if b.split("=", 1)[0].lstrip("+~") in params]
    if clash:
        raise _fail(path, "base_overrides", f"{clash} also searched in params")
    sampler = raw.get("sampler") or {"name": "tpe"}
    if sampler.get("name", "tpe") not in SAMPLERS:
        raise _fail(path, "sampler.name", f"must be one of {', '.join(SAMPLERS)}")
    pruner = raw.get("pruner") or {"name": "none"}
    if pruner.get("name", "none") not in PRUNERS:
        raise _fail(path, "pruner.name", f"must be one of {', '.join(PRUNERS)}")
    if pruner.get("name", "none") != "none" and len(objs) > 1:
        raise _fail(path, "pruner", "Optuna prunes single-objective studies only; set "
                    "`pruner: {name: none}` for a multi-objective search")
    launcher = raw.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise _fail(path, "launcher", f"must be one of {', '.join(LAUNCHERS)}")
    n_trials = raw.get("n_trials")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise _fail(path, "n_trials", f"must be an integer >= 1, got {n_trials!r}")
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise _fail(path, "workers", f"must be an integer >= 1, got {workers!r}")
    try:
        failures = Failures(**(raw.get("failures") or {}))
    except TypeError as e:
        raise _fail(path, "failures", f"{e} (fields: heartbeat_interval, grace_period, "
                    f"max_retry, wait_for_running)") from None
    if failures.heartbeat_interval < 1 or failures.grace_period <= failures.heartbeat_interval:
        raise _fail(path, "failures", "needs heartbeat_interval >= 1 and grace_period > "
                    "heartbeat_interval (seconds)")
    return SearchSpace(path=path, name=str(raw.get("name") or path.stem), n_trials=n_trials,
                       objectives=objs, params=params, base_overrides=list(base),
                       sampler=dict(sampler), pruner=dict(pruner), workers=workers,
                       launcher=launcher, failures=failures, slurm=dict(raw.get("slurm") or {}),
                       raw=raw)


# -- Hydra -----------------------------------------------------------------------------------
def to_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar."""
    if value is None:
        v = "null"
    elif isinstance(value, bool):
        v = "true" if value else "false"
    elif isinstance(value, float):
        v = repr(value) if math.isfinite(value) else str(value)
    elif isinstance(value, int):
        v = str(value)
    else:
        s = str(value)
        v = s if s.replace("_", "").replace("-", "").replace(".", "").isalnum() else repr(s)
    return f"{key}={v}"


def compose_post_train(overrides: list[str]) -> DictConfig:
    """The `persistworld post-train OVERRIDES` config, via Hydra's compose API."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return compose("post_train", overrides=list(overrides))
    with initialize_config_module("persistworld.conf", version_base="1.3"):
        return compose("post_train", overrides=list(overrides))


def _compose(space: SearchSpace, overrides: list[str], what: str) -> DictConfig:
    from omegaconf.errors import OmegaConfBaseException
    try:
        return compose_post_train(overrides)
    except (OmegaConfBaseException, ValueError, KeyError) as e:
        raise SpaceError(f"search space {space.path}: {what}: cannot compose post_train with "
                         f"{overrides}: {str(e).splitlines()[0]}") from None


def validate_space(space: SearchSpace, overrides: list[str] = ()) -> DictConfig:
    """Check the whole space before any trial: every key exists, every bound/choice composes
    and passes ``post_train.validate``, the objectives are produced. Returns the base config."""
    from persistworld.trainers.post_train import validate
    for what, make in (("sampler", space.make_sampler), ("pruner", space.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as e:
            raise SpaceError(f"search space {space.path}: {what} {getattr(space, what)}: {e}") \
                from None
    reserved = [o for o in [*space.base_overrides, *overrides]
                if o.split("=", 1)[0].lstrip("+~") in RESERVED]
    if reserved:
        raise SpaceError(f"search space {space.path}: {', '.join(reserved)}: set by the search "
                         f"driver (trials are scored on the val split, each in its own run_dir)")
    base_ov = [*space.base_overrides, *overrides, *SEARCH_OVERRIDES]
    cfg = _compose(space, base_ov, "base_overrides + command-line overrides")
    missing = object()
    for key in space.params:
        if OmegaConf.select(cfg, key, default=missing) is missing:
            raise SpaceError(f"search space {space.path}: params.{key}: no such setting in the "
                             f"post_train config")
        node = OmegaConf.select(cfg, key)
        if isinstance(node, (DictConfig, list)) or OmegaConf.is_config(node):
            raise SpaceError(f"search space {space.path}: params.{key}: is a config group / "
                             f"mapping, not a single setting")
    if not cfg.eval.enabled:
        raise SpaceError(f"search space {space.path}: eval.enabled=false, but the objectives "
                         f"are read from the run's final evaluation")
    if space.pruning and not int(cfg.trainer.eval_every or 0):
        raise SpaceError(f"search space {space.path}: pruner {space.pruner['name']!r} needs "
                         f"in-training checks: set trainer.eval_every > 0 in base_overrides")
    if any(o.metric.split("/")[0] in MASKS for o in space.objectives) and not cfg.eval.masked:
        raise SpaceError(f"search space {space.path}: a masked objective needs eval.masked=true")
    try:
        validate(cfg)
    except ValueError as e:
        raise SpaceError(f"search space {space.path}: base config: {e}") from None
    for key, p in space.params.items():
        for value in p.extremes():
            ov = to_override(key, value)
            c = _compose(space, [*base_ov, ov], f"params.{key}={value!r}")
            try:
                validate(c)
            except ValueError as e:
                raise SpaceError(f"search space {space.path}: params.{key}={value!r}: {e}") \
                    from None
    return cfg
