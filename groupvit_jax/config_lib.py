"""Config helpers: the paper's model definition and loading `file.py:arg` config specs."""

import importlib.util
import json
import os

import ml_collections


def segclip_model(size: str = "B/16") -> ml_collections.ConfigDict:
  """SegCLIP on OpenAI CLIP ViT-B/16 (or B/32): 8 centers after block 10, 2 cross-attention blocks, tau 0.9."""
  patch = {"B/16": 16, "B/32": 32}[size]
  return ml_collections.ConfigDict(dict(
      name="segclip",
      image=dict(image_size=224, patch_size=patch, width=768, layers=12, heads=12),
      text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8),
      group=dict(num_groups=8, cross_layers=2, insert_after=10, tau=0.9),
      # The masked reconstruction's decoder (loss.reconstruction_weight): the reference's is width 384 (half
      # the tower's), 3 blocks, 8 heads, from a quarter of the patches. dim 0: none.
      reconstruction=dict(dim=0, depth=3, num_heads=8, mask_ratio=0.75),
      projection_dim=512,
      dtype="float32",
      kernels="xla",
  ))


def lseg_model() -> ml_collections.ConfigDict:
  """LSeg as the reference's `clip_vitl16_384`: ViT-L/16 at 384 px hooked after blocks 5, 11, 17, 23, readout
  "project", reassembled levels 256/512/1024/1024 wide (x4, x2, x1, x0.5), a decoder 256 wide with
  BatchNorm, label embeddings 512 wide from CLIP ViT-B/32's text tower, logit scale 1/0.07."""
  return ml_collections.ConfigDict(dict(
      name="lseg",
      image=dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, hooks=(5, 11, 17, 23),
                 mlp_ratio=4.0),
      # The text tower: "clip" (TextTransformer + bias-free text_projection) or "groupvit" (+ ProjectMLP).
      text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8, layout="clip"),
      decoder=dict(features=256, level_widths=(256, 512, 1024, 1024), reassemble=(4, 2, 1, 0.5),
                   readout="project", use_bn=True, arch_option=0, block_depth=0, activation="lrelu"),
      projection_dim=512,
      projection_layers=1,
      projection_hidden_dim=4096,
      logit_scale=1 / 0.07,
      dtype="float32",
      kernels="xla",
  ))


def groupvit_s_model() -> ml_collections.ConfigDict:
  """GroupViT-S exactly as the paper and the official release define it."""
  return ml_collections.ConfigDict(dict(
      name="groupvit",
      image=dict(
          image_size=224,
          patch_size=16,
          dim=384,
          depths=(6, 3, 3),
          num_heads=(6, 6, 6),
          num_group_tokens=(64, 8, 0),
          num_output_groups=(64, 8),
          mlp_ratio=4.0,
          drop_path_rate=0.1,
          hard_assignment=True,  # False: soft assignment, no gumbel noise.
          gumbel_tau=1.0,
          assign_eps=1.0,
          assign_scale=None,  # the assignment logits' scale; None: dim**-0.5, as the reference
          group_token_residual=True,  # a group = what it gathered + its group token, as the reference
          pooling="mean",  # final group tokens -> image feature: "mean" (the reference) or "max" (SegCLIP)
      ),
      text=dict(
          context_length=77,
          vocab_size=49408,
          width=256,
          layers=12,
          heads=4,  # width // 64
      ),
      projection_dim=256,
      projection_hidden_dim=4096,
      projection_layers=2,
      contrast_temperature=0.07,  # both logit scales start at log(1 / 0.07)
      dtype="float32",  # compute dtype ("bfloat16" for mixed precision); params stay float32
      remat=False,  # rematerialise transformer blocks to save activation memory
      # The image tower's attention: "xla", or "cudnn" (NVIDIA GPUs in bf16/fp16: cuDNN's fused kernel).
      attention="xla",
      # The products' formulation: "xla" (plain), or "cpu": for bfloat16 on XLA:CPU, every product and its
      # gradients as bf16 x bf16 -> f32, which it runs natively (models/cpu_kernels.py).
      kernels="xla",
      image_splits=1,  # one CPU device: the image tower on this many independent parts of the batch
      # The decoder that redraws patches from the final groups (loss.reconstruction_weight); dim 0: none.
      reconstruction=dict(dim=0, depth=1, num_heads=4, mask_ratio=0.0),
  ))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's "key=value,key2=value2" argument over `defaults` (values keep their type)."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
    result[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return result


def load_module(path: str, what: str = "config file"):
  """Executes a Python file (a config or sweep file) as a module and returns it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_groupvit_" + what.split()[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  return load_module(path).get_config(arg or None)


def training_defaults() -> ml_collections.ConfigDict:
  """Trainer fields with the paper's recipe (GroupViT-S, batch 4096, 30 epochs)."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      input=dict(
          data=[],  # sources, see groupvit_jax/datasets/sources.py
          # The sources as a JSON list, replacing `data` when set: the form a command line can override
          # (--config.input.data_json='[{"kind": "tfrecord", "patterns": ["gs://B/cc12m/*.tfrecord"]}]').
          data_json="",
          pp="random_resized_crop(224)|flip|normalize|nouns|prompts(3)",
          tokenizer="clip_bpe",  # or "sentencepiece:/path/sp.model"
          context_length=77,
          # Prompts ("a photo of a {noun}.") tokenized at this shorter length and encoded apart from the
          # caption: the same embeddings (causal mask) for a fraction of the text tower's work. Slots
          # filled with the caption reuse the caption's feature; longer noun prompts are cut to it and
          # counted as data/prompts_cut. None: prompts at context_length, in one array with the caption.
          prompt_length=None,
          batch_size=4096,  # global
          num_examples=28_660_000,  # one epoch, for durations given in epochs
          threads=0,  # tf.data private thread pool (0: TF's default)
      ),
      total_epochs=30,
      warmup_epochs=2,
      optim=dict(
          lr=1.6e-3, reference_batch=4096,  # lr scales by batch / reference_batch
          warmup_lr=4e-6, min_lr=4e-5,
          weight_decay=0.05, decay_mask="ndim!=1",  # or a regex over parameter paths
          b1=0.9, b2=0.999, eps=1e-8,
          clip_norm=5.0,
          freeze="",  # regex of parameters to keep fixed
          lr_scales={},  # {regex over parameter paths: factor of the learning rate}, first match wins
          grad_accum_steps=1,
          bf16_moments=False,
      ),
      loss=dict(
          multi_label_weight=1.0,
          # Grouping losses (SegCLIP's), off in the paper's recipe. Reconstruction of the patches from the
          # final groups (decoder: model.reconstruction); `reconstruction_norm_pix`: targets normalised per patch.
          reconstruction_weight=0.0, reconstruction_norm_pix=False,
          # Superpixel consistency: needs the `superpixels` pp op; on the first stage's and the chained map.
          superpixel_weight=0.0,
      ),
      mesh=dict(data=-1, fsdp=1, model=1),
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,
      eval_every=0,  # 0: evaluators run only at the end
      evals={},  # name -> evaluator config, see groupvit_jax/evaluators
      init_from="",  # an imported checkpoint (models/convert.py) to start from
  ))


def resolve_data(config: ml_collections.ConfigDict) -> None:
  """Replaces `config.input.data` by the sources `config.input.data_json` lists, when it is set."""
  text = config.input.get("data_json")
  if not text:
    return
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"input.data_json is not valid JSON ({e.msg} at character {e.pos}): {text[:80]!r}") from None
  if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "kind" in d for d in data):
    raise ValueError(f"input.data_json must be a non-empty JSON list of sources with a \"kind\" each, "
                     f"e.g. '[{{\"kind\": \"tfrecord\", \"patterns\": [\"shards/*.tfrecord\"]}}]'; got {text[:80]!r}")
  config.input.data = data
  config.input.data_json = ""


def steps(config: ml_collections.ConfigDict, prefix: str) -> int:
  """Resolves a duration given as `{prefix}_steps`, `_epochs` or `_examples` into steps."""
  given = [k for k in ("steps", "epochs", "examples") if config.get(f"{prefix}_{k}") is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of {prefix}_steps, {prefix}_epochs, {prefix}_examples (got {given})")
  value, batch = config.get(f"{prefix}_{given[0]}"), config.input.batch_size
  if given[0] == "steps":
    return int(value)
  examples = value * config.input.num_examples if given[0] == "epochs" else value
  return int(round(examples / batch))


def validate(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], num_processes: int) -> None:
  """Stops at start with one clear line for configs that cannot train.

  `mesh_shape` is the built mesh's axis sizes (sharding.make_mesh resolves the -1 axis).
  """
  m = config.model
  img = m.image
  if img.image_size % img.patch_size:
    raise ValueError(f"model.image.image_size {img.image_size} is not divisible by patch_size {img.patch_size}")
  if m.get("name", "groupvit") == "segclip":
    _validate_segclip(config)
  elif m.get("name") == "lseg":
    _validate_lseg(config)
  else:
    _validate_groupvit(config)
  if m.text.width % m.text.heads:
    raise ValueError(f"model.text.width {m.text.width} is not divisible by heads {m.text.heads}")
  if config.input.context_length > m.text.context_length:
    raise ValueError(f"input.context_length {config.input.context_length} exceeds model.text.context_length "
                     f"{m.text.context_length}")
  prompt_length = config.input.get("prompt_length")
  if prompt_length is not None and not 2 <= prompt_length <= config.input.context_length:
    raise ValueError(f"input.prompt_length {prompt_length}: expected None or 2..input.context_length "
                     f"({config.input.context_length})")
  if config.loss.get("superpixel_weight", 0) and "superpixels" not in config.input.pp:
    raise ValueError(f"loss.superpixel_weight > 0 needs the superpixels pp op in input.pp ({config.input.pp!r})")
  batch = config.input.batch_size
  if batch % num_processes:
    raise ValueError(f"input.batch_size {batch} is not divisible by the {num_processes} processes")
  data_axes = mesh_shape["data"] * mesh_shape["fsdp"]
  if batch % data_axes:
    raise ValueError(f"input.batch_size {batch} is not divisible by the data axes of the mesh ({data_axes} devices)")


def _validate_groupvit(config: ml_collections.ConfigDict) -> None:
  m = config.model
  img = m.image
  n = len(img.depths)
  if not (len(img.num_heads) == len(img.num_group_tokens) == n and len(img.num_output_groups) == n - 1):
    raise ValueError(f"model.image: depths, num_heads and num_group_tokens need one entry per stage ({n}) "
                     f"and num_output_groups one per grouping stage ({n - 1})")
  if any(g <= 0 for g in img.num_group_tokens[:-1]) or img.num_group_tokens[-1] != 0:
    raise ValueError(f"model.image.num_group_tokens {tuple(img.num_group_tokens)}: every stage but the last "
                     "needs group tokens, the last none")
  for i, h in enumerate(img.num_heads):
    if img.dim % h:
      raise ValueError(f"model.image.dim {img.dim} is not divisible by num_heads[{i}] = {h}")
  _validate_reconstruction(config)


def _validate_reconstruction(config: ml_collections.ConfigDict) -> None:
  m = config.model
  r = m.get("reconstruction", {})
  if config.loss.get("reconstruction_weight", 0) and not r.get("dim"):
    raise ValueError("loss.reconstruction_weight > 0 needs a decoder: set model.reconstruction.dim > 0")
  if r.get("dim") and not 0 <= r.mask_ratio < 1:
    raise ValueError(f"model.reconstruction.mask_ratio {r.mask_ratio}: expected 0 <= ratio < 1")
  if r.get("dim") and r.dim % r.num_heads:
    raise ValueError(f"model.reconstruction.dim {r.dim} is not divisible by num_heads {r.num_heads}")


def _validate_segclip(config: ml_collections.ConfigDict) -> None:
  img, group = config.model.image, config.model.group
  if img.width % img.heads:
    raise ValueError(f"model.image.width {img.width} is not divisible by heads {img.heads}")
  if not 0 < group.insert_after <= img.layers:
    raise ValueError(f"model.group.insert_after {group.insert_after}: expected 1..model.image.layers ({img.layers})")
  _validate_reconstruction(config)
  if config.model.get("reconstruction", {}).get("dim") and config.model.reconstruction.dim % 4:
    raise ValueError(f"model.reconstruction.dim {config.model.reconstruction.dim}: SegCLIP's decoder's sine-cosine "
                     "positions need a multiple of 4")



def _validate_lseg(config: ml_collections.ConfigDict) -> None:
  img, d = config.model.image, config.model.decoder
  if img.width % img.heads:
    raise ValueError(f"model.image.width {img.width} is not divisible by heads {img.heads}")
  if len(img.hooks) != 4 or not all(0 <= h < img.layers for h in img.hooks) or list(img.hooks) != sorted(img.hooks):
    raise ValueError(f"model.image.hooks {tuple(img.hooks)}: expected 4 increasing block indices in 0..{img.layers - 1}")
  if len(d.level_widths) != 4 or len(d.reassemble) != 4 or not all(f in (0.5, 1, 2, 4, 8) for f in d.reassemble):
    raise ValueError(f"model.decoder: level_widths and reassemble need 4 entries each, reassemble factors in "
                     f"(0.5, 1, 2, 4, 8); got {tuple(d.level_widths)}, {tuple(d.reassemble)}")
  if d.readout not in ("ignore", "add", "project"):  # models/lseg.py READOUTS
    raise ValueError(f"model.decoder.readout must be ignore, add or project, got {d.readout!r}")
  if d.arch_option not in (0, 1, 2) or (d.arch_option and d.block_depth < 1):
    raise ValueError(f"model.decoder.arch_option {d.arch_option} (block_depth {d.block_depth}): expected 0, or 1/2 "
                     "with block_depth >= 1")
  if not config.get("labels"):
    raise ValueError("config.labels: LSeg training needs the dataset's label names (class 0 first)")
