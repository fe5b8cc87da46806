"""The CPU demo: a small GroupViT trained from scratch on the shapes world in minutes (`make demo`).

  python -m groupvit_jax.demo --workdir=/tmp/gvj_demo
  python -m groupvit_jax.train --config=configs/demo.py:data_dir=/tmp/tfds --workdir=/tmp/gvj_demo

The default recipe: one grouping stage (64 patch tokens -> 8 groups, 4 blocks before it and 1 after),
hard gumbel assignment, a linear projector, the contrastive and multi-label losses, and the
reconstruction of every patch from its group (weight 5, a 1-block decoder). docs/demo.md compares it with
the variants these arguments (`configs/demo.py:key=value,...`) select:
  model=segclip       SegCLIP from scratch: CLIP-style tower (5 blocks of width 64), 8 learnable centers after
                      block 4, max over the regions, SegCLIP's masked reconstruction; the other knobs as below
  stages=2            two grouping stages (groups1 -> groups2: 16 -> 8), the paper's layout
  stages=0            a plain ViT (no grouping): pixels take the class of their patch's embedding
  recon=0             no reconstruction loss; mask=0.75 reconstructs from a second pass over a quarter
                      of the patches (SegCLIP's default; GroupViT's is mask=0, every patch from the main
                      pass); recon_dim, recon_depth, norm_pix: the decoder and its targets
  superpixels=1       the superpixel consistency loss (Felzenszwalb superpixels in tf.data)
  proj_layers=2       the paper's BatchNorm MLP projector; pooling=max: SegCLIP's max over the groups
  multi_label=0, hard=0, assign_scale, groups1, groups2, depth1, final_depth: the model's other knobs
  steps, batch, lr, warmup, seed, size, patch, dim, crop (smallest crop area; 1: none), templates (of the
  training prompts): the recipe's knobs; world: the shapes-world builder config (default coded<size>,
  the world where each class has its own colour; size<size> is the standard world of random colours).
"""

import os

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(
      arg, data_dir=os.environ.get("GROUPVIT_JAX_DATA", "/tmp/groupvit_jax_tfds"), multi_label=1, hard=1,
      stages=1, steps=1200, batch=64, lr=2e-3, size=32, patch=4, dim=64, warmup=100, crop=1.0, templates="simple",
      world="", model="groupvit", groups1=16, groups2=8, recon=5.0, mask=-1.0, recon_dim=64, recon_depth=1, norm_pix=0,
      superpixels=0.0, seed=0, assign_scale=0.0, proj_layers=1, pooling="mean", depth1=4, final_depth=1,
      group_residual=1)
  config = config_lib.training_defaults()
  model = config_lib.groupvit_s_model()
  if arg.stages == 2:
    grouping = dict(depths=(2, 2, 1), num_heads=(4, 4, 4), num_group_tokens=(arg.groups1, arg.groups2, 0),
                    num_output_groups=(arg.groups1, arg.groups2))
  elif arg.stages == 0:  # a plain ViT: segmentation by patch-text similarity
    grouping = dict(depths=(5,), num_heads=(4,), num_group_tokens=(0,), num_output_groups=())
  elif arg.stages == 1:
    grouping = dict(depths=(arg.depth1, arg.final_depth), num_heads=(4, 4), num_group_tokens=(arg.groups2, 0),
                    num_output_groups=(arg.groups2,))
  else:
    raise ValueError(f"configs/demo.py: stages must be 0, 1 or 2, got {arg.stages}")
  model.image.update(image_size=arg.size, patch_size=arg.patch, dim=arg.dim, drop_path_rate=0.0,
                     hard_assignment=bool(arg.hard), assign_scale=arg.assign_scale or None, pooling=arg.pooling,
                     group_token_residual=bool(arg.group_residual),
                     **grouping)
  model.text.update(context_length=16, vocab_size=49408, width=arg.dim, layers=2, heads=4)
  model.update(projection_dim=64, projection_hidden_dim=256, projection_layers=arg.proj_layers)
  if arg.recon:
    model.reconstruction.update(dim=arg.recon_dim, depth=arg.recon_depth, num_heads=4, mask_ratio=max(arg.mask, 0.0))
  if arg.model == "segclip":
    model = config_lib.segclip_model()
    model.image.update(image_size=arg.size, patch_size=arg.patch, width=arg.dim, layers=arg.depth1 + arg.final_depth,
                       heads=4)
    model.text.update(context_length=16, vocab_size=49408, width=arg.dim, layers=2, heads=4)
    model.group.update(num_groups=arg.groups2, insert_after=arg.depth1)
    model.projection_dim = 64
    if arg.recon:
      model.reconstruction.update(dim=arg.recon_dim, depth=arg.recon_depth, num_heads=4,
                                  mask_ratio=0.75 if arg.mask < 0 else arg.mask)
  elif arg.model != "groupvit":
    raise ValueError(f"configs/demo.py: model must be groupvit or segclip, got {arg.model!r}")
  config.model = model
  crop = f"random_resized_crop({arg.size}, scale=({arg.crop}, 1.0))|" if arg.crop < 1 else ""
  superpixels = f"superpixels({arg.patch})|" if arg.superpixels else ""
  config.input.update(
      data=[dict(kind="shapes", config=arg.world or f"coded{arg.size}", split="train", data_dir=arg.data_dir)],
      pp=f"decode|{crop}flip|{superpixels}normalize|nouns|prompts(3, templates={arg.templates!r})",
      context_length=16, batch_size=arg.batch, num_examples=50_000)
  config.seed = arg.seed
  config.loss.update(multi_label_weight=float(arg.multi_label), reconstruction_weight=arg.recon,
                     reconstruction_norm_pix=bool(arg.norm_pix), superpixel_weight=arg.superpixels)
  config.total_epochs = None
  config.warmup_epochs = None
  config.total_steps = arg.steps
  config.warmup_steps = arg.warmup
  config.optim.update(lr=arg.lr, reference_batch=arg.batch, warmup_lr=1e-5, min_lr=1e-5)
  config.log_every = 50
  config.checkpoint_every = 500
  config.keep_checkpoints = 1
  return config
