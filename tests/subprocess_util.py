"""Running the project's command lines from tests: timeouts guard against hangs, never against slowness.

Each limit is about ten times the command's time on a quiet 2-core machine, so a loaded machine (2-3x
slower) stays far inside it; a limit that fires fails the test naming the command and its last lines.
"""

import subprocess


def tail(text: str | bytes | None, lines: int = 40) -> str:
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  return "\n".join((text or "").splitlines()[-lines:])


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run` with text output captured; on timeout, a test failure with the child's last lines."""
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"hung: {' '.join(cmd[:4])} ... did not finish in {timeout:.0f} s (about ten times its "
                         f"time on a quiet machine); its last output:\n{tail(e.stdout)}\n{tail(e.stderr)}") from None
