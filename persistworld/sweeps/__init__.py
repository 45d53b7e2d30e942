"""Ablation sweeps: pre-flight validation, the sweep job function, submitit launchers."""
