"""GroupViT-S batch size with the learning rate moved along (zip): the paper's 4096 against 2048.

  python launch/sweep.py --sweep=configs/sweeps/groupvit_s_batch.py --workdir_root=gs://BUCKET/sweeps \
      --mode=tpu --name=gvj --zone=us-central2-b
"""


def get_sweep():
  return {
      "base": "configs/groupvit_s.py",
      "zip": {"input.batch_size": [4096, 2048], "seed": [0, 1]},
  }
