"""Hydra configs of the `persistworld` commands (`pkg://persistworld.conf`).

Importing this package registers the typed schemas of `post_train` in Hydra's ConfigStore
(Hydra imports it when it reads `pkg://persistworld.conf`).
"""
from persistworld.conf import schema as _schema  # noqa: F401  (registers the schemas)
