"""LSeg on the CPU: a small ViT + DPT decoder trained on the shapes world's masks in minutes.

  python -m groupvit_jax.train --config=configs/lseg_demo.py --workdir=/tmp/lseg_demo
  python -m groupvit_jax.train --config=configs/lseg_demo.py:unseen=2,text=/tmp/groupvit_jax_demo --workdir=...

The coded shapes world at 32 px (the GroupViT demo's), masks as labels: 9 labels (background and the 8
shapes), per-pixel cross-entropy, SGD with momentum and poly decay (decoder and head at 10x the backbone's
rate), random scale (0.5-2) / crop / flip of image and mask together. Every 300 steps and at the end,
mIoU on 200 held-out images (seed 1) with all 9 label names.

Arguments (`configs/lseg_demo.py:key=value,...`):
  unseen=2     train on background + the first 6 shapes only (diamond and hexagon pixels unscored), test
               on all 8: LSeg's unseen-label protocol
  text=PATH    the text tower (and its projector) from a GroupViT workdir trained by configs/demo.py, frozen;
               default: a text tower trained from scratch with the rest (it has nothing to be frozen to)
  steps, batch, lr, seed, size, patch, dim, features, world: the recipe's knobs
"""

import os

import ml_collections

from groupvit_jax import config_lib, demo
from groupvit_jax.datasets import shapes


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
      arg, data_dir=os.environ.get("GROUPVIT_JAX_DATA", "/tmp/groupvit_jax_tfds"), steps=600, batch=32, lr=0.02,
      seed=0, size=32, patch=4, dim=64, features=32, unseen=0, text="", world="", eval_every=300)
  config = config_lib.training_defaults()
  model = config_lib.lseg_model()
  model.image.update(image_size=arg.size, patch_size=arg.patch, width=arg.dim, layers=4, heads=4, hooks=(0, 1, 2, 3))
  # The GroupViT demo's text tower (configs/demo.py), so that its checkpoint can supply one.
  model.text.update(context_length=16, vocab_size=49408, width=64, layers=2, heads=4, layout="groupvit")
  model.decoder.update(features=arg.features, level_widths=(arg.features,) * 2 + (2 * arg.features,) * 2)
  model.projection_dim = 64
  config.model = model
  names = (shapes.BACKGROUND,) + shapes.CLASSES
  seen = tuple(range(len(names) - arg.unseen))
  config.labels = [names[i] for i in seen]
  remap = f"map_labels({seen})|" if arg.unseen else ""
  config.input.update(
      data=[dict(kind="shapes", config=arg.world or f"coded{arg.size}", split="train", data_dir=arg.data_dir,
                 masks=True)],
      pp=f"decode|decode_mask|{remap}random_scale_crop({arg.size}, scale=(0.5, 2.0))|flip|normalize",
      context_length=16, batch_size=arg.batch, num_examples=50_000)
  config.seed = arg.seed
  config.total_epochs = None
  config.warmup_epochs = None
  config.total_steps = arg.steps
  config.warmup_steps = 0
  # LSeg's recipe: SGD (momentum 0.9, weight decay 1e-4), poly decay 0.9, the new layers at 10x.
  config.optim.update(name="sgd", schedule="poly", lr=arg.lr, reference_batch=arg.batch, momentum=0.9,
                      weight_decay=1e-4, clip_norm=0.0, lr_scales={"^(?!backbone/)": 10.0})
  if arg.text:
    config.init_text_from = arg.text  # a GroupViT workdir of configs/demo.py
    config.optim.freeze = "^text_"
  config.log_every = 50
  config.checkpoint_every = 300
  config.keep_checkpoints = 1
  config.eval_every = arg.eval_every
  # The GroupViT demo's held-out split (written once next to the data); LSeg names the background itself.
  config.evals = demo.heldout_evals(config, demo.heldout_root(config, 200), 200, bg_threshold=0.5)
  return config
