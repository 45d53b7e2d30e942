"""Trainers: ``base`` (teacher-forced base training, ``persistworld train-base``) and
``post_train`` (RL post-training). Imported lazily so that importing one trainer's helpers does
not import the others."""
from __future__ import annotations

__all__ = ["train_base"]


def __getattr__(name: str):
    if name == "train_base":
        from persistworld.trainers.base import train_base
        return train_base
    raise AttributeError(name)
