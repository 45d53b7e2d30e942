"""`persistworld export-model RUN_DIR OUT.pt`: a compact copy of a trained world model.

The copy records the data settings of the run (from its config.yaml), so that the pipeline
can tell whether it was made for the dataset at hand, and the command that regenerates it."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from persistworld.world_model import export_world_model
from persistworld.errors import MissingFile, UserError


def sampler_settings(items: list[str]) -> dict:
    """``--sampler KEY=VALUE`` items (repeatable) as a dict of YAML-parsed values."""
    sampler = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--sampler {item!r}: expected KEY=VALUE")
        sampler[key] = yaml.safe_load(value)
    return sampler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld export-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run directory with model.pt and config.yaml")
    ap.add_argument("out", help="the file to write (e.g. models/mini_droid_base.pt)")
    ap.add_argument("--float32", action="store_true", help="keep float32 weights")
    ap.add_argument("--command", default="", help="the command that regenerates the model")
    ap.add_argument("--sampler", action="append", default=[], metavar="KEY=VALUE",
                    help="a sampler setting chosen after training (sigma_min, sigma_max, "
                         "num_steps, sampler, rho); repeatable")
    a = ap.parse_args(argv)
    sampler = sampler_settings(a.sampler)
    run = Path(a.run_dir)
    config = run / "config.yaml"
    if not config.exists():
        raise MissingFile(f"{config} is missing: export-model needs a run directory made "
                          f"by `persistworld train-base` or `post-train`")
    data = (yaml.safe_load(config.read_text()) or {}).get("data", {})
    data.pop("root", None)
    data.pop("workers", None)
    out = export_world_model(run, a.out, half=not a.float32,
                             extra={"data": data, "command": a.command}, sampler=sampler)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
