"""Launching runs: Cloud TPU VM slices (tpu_vm), local multi-process runs (local), sweeps (sweep).

Run from the repository root: `python -m launch.tpu_vm ...`, `python -m launch.local ...`,
`python -m launch.sweep ...`. The trainer imports nothing from here.
"""
