"""The `persistworld` console command: one subcommand per pipeline stage, Hydra overrides after.

    persistworld render data.num_episodes=200 data.workers=2
    persistworld preview episode=3
    persistworld train-base trainer.steps=2000
    persistworld pipeline                      # the README's main job on the embedded default

Every Hydra-backed subcommand accepts the usual Hydra flags (`--cfg job`, `--help`,
`--multirun`, `hydra/launcher=...`). Errors a user can fix (bad settings, a mistyped key,
missing or corrupt files: ``persistworld.errors.UserError`` and Hydra's composition errors)
print one line naming the setting or file and exit with status 2, with no traceback, before
any work starts; every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

# name -> (Hydra config name, "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "render": ("render", "persistworld.cli:render_main",
               "render the mini-DROID dataset with pybullet into data.root"),
    "preview": ("preview", "persistworld.data.preview:preview_main",
                "write a PNG contact sheet (views x time, RGB and masks) of one episode"),
    "train-base": ("train_base", "persistworld.trainers.base:train_base",
                   "teacher-forced base training of the world model"),
    "post-train": ("post_train", "persistworld.trainers.post_train:post_train",
                   "PersistWorld RL post-training of a base world model"),
    "evaluate": ("evaluate", "persistworld.evaluation.run:evaluate_main",
                 "autoregressive / teacher-forced rollout evaluation with videos"),
    "pipeline": ("pipeline", "persistworld.pipeline:pipeline_main",
                 "the main job: data -> base model -> post-training -> evaluation -> results"),
}


# name -> ("module:main(argv)", one-line help): plain argparse commands (no Hydra config)
PLAIN_COMMANDS: dict[str, tuple[str, str]] = {
    "report": ("persistworld.analysis.report:main",
               "render a sweep's report (tables, statistics, figures) from run directories"),
    "collect": ("persistworld.analysis.collect:main",
                "collect run directories into one table (Parquet and CSV)"),
    "search": ("persistworld.search.driver:main",
               "asynchronous Optuna search over post-train settings (sweeps/optuna/*.yaml)"),
    "search-report": ("persistworld.search.report:main",
                      "trials table, best.yaml preset and plots of a search study directory"),
    "sweep": ("persistworld.sweeps.command:main",
              "run a paper ablation sweep (sweeps/NAME.yaml): pre-flight, then Hydra multirun"),
    "export-model": ("persistworld.world_model.export:main",
                     "write a compact (float16) copy of a trained model.pt to ship or share"),
    "interact": ("persistworld.rollout.interactive:main",
                 "roll a world model out by replay, keyboard or a policy in the loop"),
    "convert-data": ("persistworld.data.convert:main",
                     "convert Ctrl-World's preprocessed data or LeRobot DROID into a dataset"),
    "policy-eval": ("persistworld.policy_eval.cli:main",
                    "rank policies in the simulator and in world models (paper App. C)"),
    "train-judge": ("persistworld.policy_eval.judge:train_main",
                    "train the stage-progress judge of generated video on simulator rollouts"),
    "train-policy": ("persistworld.policy_eval.bc:train_main",
                     "train a vision policy by behaviour cloning on the rendered episodes"),
    "import-model": ("persistworld.world_model.importer:main",
                     "build a model.pt from a backend config (e.g. the released Ctrl-World)"),
    "study": ("persistworld.study.cli:main",
              "the human 2AFC preference study: create | serve | report (paper App. D)"),
    "fetch-lpips": ("persistworld.cli:fetch_lpips_main",
                    "download the genuine LPIPS (AlexNet v0.1) weights into the local cache"),
}


def fetch_lpips_main(argv: list[str]) -> int:
    from persistworld.metrics.lpips import DEFAULT_WEIGHTS, fetch_lpips_weights
    dest = argv[0] if argv else DEFAULT_WEIGHTS
    print(f"LPIPS weights: {fetch_lpips_weights(dest)}")
    return 0


def render_main(cfg) -> None:
    from persistworld.data.render import render_dataset
    root = render_dataset(cfg.data)
    print(f"dataset ready in {root}")


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from persistworld.errors import UserError
    return (UserError, OmegaConfBaseException, HydraException)


def one_line(e: BaseException) -> str:
    """A user error as one line (Hydra's composition errors span several lines and keep the
    useful part in their cause: 'Could not override x' + 'Key y not in Z')."""
    from hydra.errors import MissingConfigException
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, MissingConfigException):
        opts = [ln for ln in lines[2:] if not ln.startswith(("Config search path", "provider="))]
        return lines[0] + (f" (available: {', '.join(opts)})" if opts else "")
    head = lines[0] if lines else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        head = f"{head.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    rest = [ln for ln in lines[1:] if not ln.startswith(("full_key", "reference_type",
                                                         "object_type"))]
    return head + (f" ({'; '.join(rest)})" if rest else "")


def _guarded(fn: Callable) -> Callable:
    def task(cfg):
        try:
            return fn(cfg)
        except _user_errors() as e:
            print(f"persistworld: error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
    task.__name__ = fn.__name__
    task.__module__ = fn.__module__
    return task


# command -> "module:function" checking its composed config (raises UserError) before Hydra
# starts the job (and creates its run directory)
CHECKS = {"post-train": "persistworld.trainers.post_train:validate",
          "train-base": "persistworld.trainers.base:validate"}


def _precompose(cmd: str, config_name: str, rest: list[str]) -> None:
    """Compose the command's config with its overrides before Hydra does, so a mistyped key,
    a wrong type, an unknown preset or an impossible setting is one line and exit 2, with
    nothing created (Hydra's own report is several lines and exit 1). Skipped for Hydra's own
    flags (--help, --cfg, --multirun, ...)."""
    if any(a.startswith("-") for a in rest):
        return
    from hydra import compose, initialize_config_module
    try:
        with initialize_config_module("persistworld.conf", version_base="1.3"):
            cfg = compose(config_name, overrides=rest)
        if cmd in CHECKS:
            _resolve(CHECKS[cmd])(cfg)
    except _user_errors() as e:
        print(f"persistworld {cmd}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: persistworld COMMAND [hydra overrides ...]", "", "commands:"]
    width = max(width, *map(len, PLAIN_COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in PLAIN_COMMANDS.items()]
    lines += ["", "`persistworld COMMAND --help` lists the command's config; "
              "`persistworld COMMAND --cfg job` prints it resolved."]
    return "\n".join(lines)


def _flag_value(args: list[str], names: tuple[str, ...]) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def _multirun_preflight(rest: list[str]) -> None:
    """`persistworld post-train -m --config-dir sweeps --config-name NAME ...` (Hydra's own
    route to a sweep file) gets the same pre-flight as `persistworld sweep NAME ...`: every
    job composed and checked, and nothing launched if one of them cannot run."""
    if not {"-m", "--multirun"} & set(rest) or {"--cfg", "-c", "--help", "-h"} & set(rest):
        return
    cdir = _flag_value(rest, ("--config-dir", "-cd"))
    name = _flag_value(rest, ("--config-name", "-cn"))
    if not cdir or not name:
        return
    sweep = Path(cdir) / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not sweep.is_file():
        return
    from persistworld.sweeps.command import expand, preflight, print_jobs
    values = {_flag_value(rest, f) for f in (("--config-dir", "-cd"), ("--config-name", "-cn"))}
    overrides = [a for a in rest if not a.startswith("-") and a not in values]
    try:
        jobs = preflight(sweep, expand(sweep, overrides))
    except _user_errors() as e:
        print(f"persistworld post-train: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    bad = [j for j in jobs if j.errors]
    if bad:
        print_jobs(jobs, f"sweep {sweep.stem}: {len(jobs)} jobs, {len(bad)} with errors "
                         f"(pre-flight)")
        print(f"persistworld post-train: error: {len(bad)} of {len(jobs)} jobs cannot run; "
              f"nothing was launched", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd in PLAIN_COMMANDS:
        try:
            code = _resolve(PLAIN_COMMANDS[cmd][0])(rest)
        except _user_errors() as e:
            print(f"persistworld {cmd}: error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        sys.exit(code or 0)
    if cmd not in COMMANDS:
        print(f"persistworld: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    config_name, target, _ = COMMANDS[cmd]
    if cmd == "post-train":
        _multirun_preflight(rest)
    _precompose(cmd, config_name, rest)
    import hydra
    fn = _guarded(_resolve(target))
    sys.argv = [f"persistworld {cmd}", *rest]
    hydra.main(config_path="pkg://persistworld.conf", config_name=config_name,
               version_base="1.3")(fn)()


if __name__ == "__main__":
    main()
