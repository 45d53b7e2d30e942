"""Optuna hyperparameter search over post-training settings (`persistworld search`).

space.py: search-space files (sweeps/optuna/*.yaml) and their validation; driver.py: the
study, its asynchronous workers (local processes or SLURM jobs) and their fault tolerance;
report.py: trials table, best.yaml preset and plots (`persistworld search-report`).
"""
