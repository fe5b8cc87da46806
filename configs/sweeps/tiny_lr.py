"""Learning rate x multi-label loss on the tiny config (6 runs).

  python launch/sweep.py --sweep=configs/sweeps/tiny_lr.py --workdir_root=/tmp/sweeps --mode=local
"""


def get_sweep():
  return {
      "base": "configs/tiny.py",
      "fixed": {"total_steps": 200},
      "product": {"optim.lr": [5e-4, 1e-3, 2e-3], "loss.multi_label_weight": [0.0, 1.0]},
  }
