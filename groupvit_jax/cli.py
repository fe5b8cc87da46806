"""What every command line shares: a quiet start, and expected errors as one line with exit status 2.

Import this module before anything that imports TensorFlow: TensorFlow's native start-up notices
(oneDNN, CUDA stubs, the CUDA probe) are printed by C++ when it loads and first lists its devices,
before any log setting can apply, so both happen here with the process's stderr pointed at /dev/null
(TensorFlow sees no GPU: it only reads data). `GROUPVIT_JAX_DEBUG=1` keeps them.

`run(main)` replaces `absl.app.run(main)`: a user error (a missing file, a bad value, a checkpoint that
does not fit the config, a flag left out) prints `error: <what>` on stderr and exits with status 2, no
traceback; `--debug` (or GROUPVIT_JAX_DEBUG=1) shows the traceback instead. Library INFO logs are off
unless `--verbosity` is given.
"""

import os
import sys

from absl import app, flags, logging

from groupvit_jax import quiet

DEBUG_ENV = "GROUPVIT_JAX_DEBUG"


def _import_tensorflow_quietly() -> None:
  if "tensorflow" in sys.modules or os.environ.get(DEBUG_ENV):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    with quiet.muted_stderr():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      # TensorFlow reads data only (accelerators are JAX's); listing its devices here also keeps the
      # CUDA probe's notice (printed at the first op otherwise) out of the output.
      tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass  # commands that need it say so when they import it


_import_tensorflow_quietly()


class UserError(ValueError):
  """An expected error in what the user gave (a path, a value, a file's content): shown as one line."""


# What a command reports as one line: the project raises these with a message naming the thing and what
# was expected. Anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError,
            KeyError, app.UsageError, flags.Error)


def one_line(error: BaseException) -> str:
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  text = " ".join(text.split()) or type(error).__name__
  return text


def fail(error: BaseException) -> None:
  """Prints the one line and exits with status 2. Whatever the libraries print while the process shuts
  down after it (Orbax's unfinished reads of a damaged checkpoint report their own exceptions from the
  event loop, thousands of lines) goes to /dev/null: the line above says what happened."""
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(stderr, f"error: {one_line(error)}\n".encode())  # one write: no other thread's text inside it
  sys.exit(2)


def _debug() -> bool:
  if os.environ.get(DEBUG_ENV):
    return True
  return "debug" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.debug


def _check_config_paths(argv: list[str]) -> None:
  """A config file that is not there, said before the config module's loader buries it in a traceback."""
  for arg in argv[1:]:
    name, _, value = arg.partition("=")
    if name.lstrip("-") == "config" and value:
      path = value.split(":", 1)[0]
      if not os.path.isfile(path):
        raise UserError(f"--config: {path}: no such config file")


def _parse(argv: list[str]) -> list[str]:
  try:
    _check_config_paths(argv)
    return flags.FLAGS(argv)
  except (flags.Error, UserError) as e:
    if _debug() or "--debug" in argv or "--debug=true" in argv:
      raise
    cause = e.__cause__ or e.__context__
    fail(cause if isinstance(cause, OSError) else e)


def run(main) -> None:
  """absl.app.run(main) with one-line user errors (exit status 2) and quiet library logs."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Show the traceback of a user error (or set {DEBUG_ENV}=1).")

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except EXPECTED as e:
      if _debug():
        raise
      fail(e)

  app.run(wrapped, flags_parser=_parse)
