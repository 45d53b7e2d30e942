"""Hydra configs of the `persistworld` commands (`pkg://persistworld.conf`).

Importing this package registers the typed schemas of `post_train` in Hydra's ConfigStore
(Hydra imports it when it reads `pkg://persistworld.conf`).
"""
from persistworld.conf import schema as _schema  # noqa: F401  (registers the schemas)
from omegaconf import OmegaConf as _OmegaConf

# `${sum:a,b,...}`: integer sum, for settings derived from others (a table's start pool is its
# longest prefix + branch: conf/row/branch_horizon/*.yaml)
_OmegaConf.register_new_resolver("sum", lambda *xs: sum(int(x) for x in xs), replace=True)
