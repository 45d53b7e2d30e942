"""The `persistworld` console command: one subcommand per pipeline stage, Hydra overrides after.

    persistworld render data.num_episodes=200 data.workers=2
    persistworld preview episode=3
    persistworld train-base trainer.steps=2000
    persistworld pipeline                      # the README's main job on the embedded default

Every Hydra-backed subcommand accepts the usual Hydra flags (`--cfg job`, `--help`,
`--multirun`, `hydra/launcher=...`). Errors a user can fix (bad settings, missing or corrupt
files) print one line naming the setting or file and exit with status 2, with no traceback.
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
    from persistworld.data.dataset import DatasetError
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return (ValueError, FileNotFoundError, DatasetError, OmegaConfBaseException, HydraException)


def _guarded(fn: Callable) -> Callable:
    def task(cfg):
        try:
            return fn(cfg)
        except _user_errors() as e:
            print(f"persistworld: error: {e}", file=sys.stderr)
            sys.exit(2)
    task.__name__ = fn.__name__
    task.__module__ = fn.__module__
    return task


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
    except Exception as e:
        print(f"persistworld post-train: error: {str(e).splitlines()[0]}", file=sys.stderr)
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
            print(f"persistworld {cmd}: error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(code or 0)
    if cmd not in COMMANDS:
        print(f"persistworld: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    config_name, target, _ = COMMANDS[cmd]
    if cmd == "post-train":
        _multirun_preflight(rest)
    import hydra
    fn = _guarded(_resolve(target))
    sys.argv = [f"persistworld {cmd}", *rest]
    hydra.main(config_path="pkg://persistworld.conf", config_name=config_name,
               version_base="1.3")(fn)()


if __name__ == "__main__":
    main()
