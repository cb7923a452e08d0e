"""Hyperparameter search (orchestration, above train/): Optuna studies over a config's get_sweep.

space.py (search spaces, checked before any trial), study.py (storage, samplers, pruners, dead
workers), objective.py (one trial: jaxclf.tracking.tracked_run), runner.py (workers, resume,
Ctrl-C), summary.py (best by val), cli.py (`jaxclf sweep`). Optuna is imported only here.
"""
