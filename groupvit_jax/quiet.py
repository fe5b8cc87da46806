"""The process's stderr (file descriptor 2) pointed at /dev/null for a while: native libraries (TensorFlow's
C++ start-up, TensorStore's background reads) write there directly, past any Python log setting."""

import contextlib
import os
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def muted_stderr(grace_on_error: float = 0.0) -> Iterator[None]:
  """Mutes fd 2 inside the block; on an exception, keeps it muted `grace_on_error` seconds more (for
  background threads that report the same failure as they finish) before re-raising."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  except Exception:
    time.sleep(grace_on_error)
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
