"""Launching runs: Cloud TPU VM slices (tpu_vm), local multi-process runs (local), sweeps (sweep).

Run from the repository root: `python -m launch.tpu_vm ...`, `python -m launch.local ...`,
`python -m launch.sweep ...`. The trainer imports nothing from here.
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the project's error form: one line on stderr, `error: <prog>: <what>`, exit status 2."""

  def error(self, message):
    print(f"error: {self.prog}: {message} (--help for usage)", file=sys.stderr)
    sys.exit(2)
