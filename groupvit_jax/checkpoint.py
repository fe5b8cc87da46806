"""Orbax checkpoints of model variables (imported weights; the trainer's state builds on this)."""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp


def save_variables(directory: str, variables: Mapping[str, Any]) -> None:
  """Writes `{"params": ..., "batch_stats": ...}` to `directory` atomically (Orbax's tmp + rename)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, dict(variables), force=True)


def load_variables(directory: str, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads variables written by `save_variables`.

  Args:
    directory: checkpoint directory.
    template: optional pytree of arrays/ShapeDtypeStructs (with shardings) to restore onto.
  Raises:
    FileNotFoundError / ValueError naming the directory when it is missing or unreadable.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      if template is None:
        return ckptr.restore(directory)
      target = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=getattr(x, "sharding", None)),
          nn.unbox(dict(template)))
      return ckptr.restore(directory, target)
    except Exception as e:  # Orbax raises many types; the path is what the user needs.
      raise ValueError(f"{directory}: not a readable groupvit-jax checkpoint ({type(e).__name__}: "
                       f"{str(e)[:300]})") from None
