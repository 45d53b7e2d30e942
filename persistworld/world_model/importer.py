"""`persistworld import-model [world_model=NAME] [world_model.KEY=VALUE ...] --out FILE`.

Builds a world model from its config group (``conf/world_model/NAME.yaml`` plus the overrides,
Hydra's dotted syntax) and writes it as a ``model.pt`` that ``post-train base_model=FILE`` and
``evaluate model=FILE`` load. For the published Ctrl-World:

    persistworld import-model world_model.checkpoint=/data/ctrl_world/checkpoint-10000.pt \\
        --out models/ctrl_world.pt

Every setting is checked before anything heavy is built; a missing or non-fitting checkpoint
fails with one message naming the file."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from persistworld.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf" / "world_model"


def resolve(overrides: list[str]) -> dict:
    """The world_model settings of ``overrides`` (``world_model=NAME``, ``world_model.K=V``)."""
    from omegaconf import OmegaConf
    name, dots = "ctrl_world", []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{item!r}: expected world_model=NAME or world_model.KEY=VALUE")
        if key == "world_model":
            name = value
        elif key.startswith("world_model."):
            dots.append(f"{key[len('world_model.'):]}={value}")
        else:
            raise UserError(f"{item!r}: import-model takes world_model settings only")
    path = CONF / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF.glob("*.yaml"))
        raise UserError(f"world_model={name}: no such backend config; known: {known}")
    base = OmegaConf.load(path)
    if any("${" in str(v) for v in base.values()):
        raise UserError(f"world_model={name} takes its sizes from the data config: build it "
                        f"with `persistworld train-base` instead")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(dots))
    return OmegaConf.to_container(cfg, resolve=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="persistworld import-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="world_model=NAME, world_model.KEY=VALUE")
    ap.add_argument("--out", required=True, help="the model.pt to write")
    ap.add_argument("--half", action="store_true", help="store float16 weights")
    a = ap.parse_args(argv)
    from persistworld.world_model import save_world_model, world_model_config, BACKENDS
    settings = world_model_config(resolve(a.overrides))       # checked before building
    model = BACKENDS[settings.name][1](settings)
    sd = {k: (v.half() if a.half and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    command = "persistworld import-model " + " ".join(map(shlex.quote, sys.argv[2:] if argv is None
                                                            else argv))
    out = save_world_model(model, a.out, state_dict=sd, extra={"command": command})
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f} M parameters, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
