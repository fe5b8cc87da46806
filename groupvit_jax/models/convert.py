"""Weight conversion: official NVlabs / HF transformers GroupViT state dicts <-> our Flax variables.

Our parameter tree mirrors the NVlabs names, so `nvlabs_key` is a handful of renames; HF names are
derived from NVlabs names as HF's own conversion script does (`nvlabs_to_hf` / `hf_to_nvlabs`).
Tensors are plain numpy arrays here; torch is only needed to read `.pth`/`.bin` files.

  python -m groupvit_jax.models.convert --config=configs/groupvit_s.py \
      --input=group_vit_gcc_yfcc_30e.pth --output=/tmp/groupvit_s
  python -m groupvit_jax.models.convert --config=configs/groupvit_s.py \
      --checkpoint=/tmp/groupvit_s --export_hf=/tmp/groupvit_s_hf.safetensors
"""

import os
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import numpy as np

from groupvit_jax.models.vit import resize_pos_embed

StateDict = dict[str, np.ndarray]
# Keys that carry no weights: BatchNorm's step counter, HF's position-id buffer.
_IGNORED = re.compile(r"(num_batches_tracked|position_ids)$")

_NVLABS_RULES: list[tuple[str, Any]] = [
    (r"^text_encoder/token_embedding$", "text_encoder/token_embedding/weight"),
    (r"^text_encoder/resblocks_(\d+)/attn/in_proj/kernel$", r"text_encoder/resblocks_\1/attn/in_proj_weight"),
    (r"^text_encoder/resblocks_(\d+)/attn/in_proj/bias$", r"text_encoder/resblocks_\1/attn/in_proj_bias"),
    (r"^text_encoder/resblocks_(\d+)/", r"text_encoder/transformer/resblocks_\1/"),
    (r"(resblocks_\d+)/mlp/fc1/", r"\1/mlp/c_fc/"),
    (r"(resblocks_\d+)/mlp/fc2/", r"\1/mlp/c_proj/"),
    (r"group_projector_norm/", "group_projector/0/"),
    (r"group_projector/fc", "group_projector/1/fc"),
    # ProjectMLP's nn.Sequential holds (Conv1d, BatchNorm1d, ReLU) per hidden layer.
    (r"/bn_(\d+)/", lambda m: f"/linear_hidden/{3 * int(m[1]) + 1}/"),
    (r"/linear_hidden_(\d+)/", lambda m: f"/linear_hidden/{3 * int(m[1])}/"),
    (r"(layers|blocks|resblocks)_(\d+)", r"\1/\2"),
    (r"/(kernel|scale)$", "/weight"),
    (r"/mean$", "/running_mean"),
    (r"/var$", "/running_var"),
]


def nvlabs_key(path: tuple[str, ...]) -> str:
  """Our variable path (without the collection) -> the NVlabs state-dict key."""
  key = "/".join(path)
  for pattern, repl in _NVLABS_RULES:
    key = re.sub(pattern, repl, key)
  return key.replace("/", ".")


def _to_ours(key: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """Converts one torch tensor to our layout (Linear [out, in] -> [in, out]; conv OIHW -> HWIO)."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 3 and key.endswith("weight") and value.shape[-1] == 1 and len(target_shape) == 2:
    value = value[..., 0]  # NVlabs projectors are Conv1d(kernel_size=1).
  if value.ndim == 2 and len(target_shape) == 2 and ("weight" in key and "embedding" not in key):
    return value.T
  return value


def _to_torch(key: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `_to_ours` (projector weights come out as Linear, which HF uses)."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2 and "weight" in key and "embedding" not in key:
    return value.T
  return value


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(nn.unbox(flax.core.unfreeze(tree)))


def nvlabs_to_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict[str, Any]:
  """Maps an NVlabs-named state dict onto `template` (our variables, arrays or ShapeDtypeStructs).

  Raises:
    ValueError naming the first parameter that is missing, unexpected, or of the wrong shape.
  """
  state_dict = {k: np.asarray(v) for k, v in state_dict.items() if not _IGNORED.search(k)}
  if not any(k.startswith(("img_encoder.", "text_encoder.")) for k in state_dict):
    first = next(iter(state_dict), "<empty>")
    raise ValueError(f"not a GroupViT checkpoint: no 'img_encoder.*'/'text_encoder.*' tensors "
                     f"(first key: {first!r})")
  if "multi_label_logit_scale" not in state_dict and "logit_scale" in state_dict:
    # HF checkpoints and single-label runs have one scale; the second starts from the same value.
    state_dict["multi_label_logit_scale"] = state_dict["logit_scale"]
  out: dict[str, Any] = {}
  used = set()
  for collection, tree in template.items():
    flat = {}
    for path, leaf in _flat(tree).items():
      key = nvlabs_key(path)
      if key not in state_dict:
        raise ValueError(f"checkpoint has no parameter {key!r} (needed for {'/'.join(path)}, "
                         f"shape {tuple(leaf.shape)})")
      value = _to_ours(key, state_dict[key], tuple(leaf.shape))
      if leaf.shape == () and value.size == 1:
        value = value.reshape(())  # Some checkpoints store the logit scales as [1].
      if key.endswith("pos_embed") and value.shape != tuple(leaf.shape) and value.shape[-1] == leaf.shape[-1]:
        old, new = int(round(value.shape[1]**0.5)), int(round(leaf.shape[1]**0.5))
        value = np.asarray(resize_pos_embed(value.astype(np.float32), old, (new, new)))
      if value.shape != tuple(leaf.shape):
        raise ValueError(f"parameter {key!r}: checkpoint shape {tuple(state_dict[key].shape)} does not fit "
                         f"the config's {tuple(leaf.shape)} (ours: {'/'.join(path)})")
      flat[path] = value.astype(np.float32)
      used.add(key)
    out[collection] = flax.traverse_util.unflatten_dict(flat)
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    raise ValueError(f"checkpoint parameter {unexpected[0]!r} has no place in the configured model "
                     f"({len(unexpected)} unexpected in all): is the config right?")
  return out


def variables_to_nvlabs(variables: Mapping[str, Any]) -> StateDict:
  """Our variables -> an NVlabs-named state dict (projector weights as Conv1d [out, in, 1])."""
  sd = {}
  for collection, tree in variables.items():
    for path, value in _flat(tree).items():
      key = nvlabs_key(path)
      value = _to_torch(key, np.asarray(value, np.float32))
      if "projector.linear" in key and key.endswith("weight") and value.ndim == 2:
        value = value[..., None]  # Linear -> Conv1d(kernel_size=1)
      sd[key] = value
  return sd


# ---------------------------------------------------------------------------------------------------
# NVlabs <-> HF transformers names.
# ---------------------------------------------------------------------------------------------------

# NVlabs name <-> HF transformers name: one pair per rule, both directions derived from it; the first
# rule whose pattern matches the whole name wins, so specific rules come before general ones. `{r}`
# stands for the rest of a name, any other `{x}` for one dot-free part; a name no rule matches is kept.
_NAME_PAIRS = [
    ("img_encoder.patch_embed.proj.{r}", "vision_model.embeddings.patch_embeddings.projection.{r}"),
    ("img_encoder.patch_embed.norm.{r}", "vision_model.embeddings.layernorm.{r}"),
    ("img_encoder.pos_embed", "vision_model.embeddings.position_embeddings"),
    ("img_encoder.norm.{r}", "vision_model.layernorm.{r}"),
    ("img_encoder.layers.{s}.blocks.{b}.norm{n}.{r}", "vision_model.encoder.stages.{s}.layers.{b}.layer_norm{n}.{r}"),
    ("img_encoder.layers.{s}.blocks.{b}.attn.proj.{r}", "vision_model.encoder.stages.{s}.layers.{b}.self_attn.out_proj.{r}"),
    ("img_encoder.layers.{s}.blocks.{b}.{r}", "vision_model.encoder.stages.{s}.layers.{b}.{r}"),
    ("img_encoder.layers.{s}.blocks.{b}", "vision_model.encoder.stages.{s}.layers.{b}"),
    ("img_encoder.layers.{s}.downsample.pre_assign_attn.attn.proj.{r}",
     "vision_model.encoder.stages.{s}.downsample.pre_assign_attn.attn.out_proj.{r}"),
    ("img_encoder.layers.{s}.{r}", "vision_model.encoder.stages.{s}.{r}"),
    ("text_encoder.transformer.resblocks.{l}.attn.out_proj.{r}", "text_model.encoder.layers.{l}.self_attn.out_proj.{r}"),
    ("text_encoder.transformer.resblocks.{l}.ln_{n}.{r}", "text_model.encoder.layers.{l}.layer_norm{n}.{r}"),
    ("text_encoder.transformer.resblocks.{l}.mlp.c_fc.{r}", "text_model.encoder.layers.{l}.mlp.fc1.{r}"),
    ("text_encoder.transformer.resblocks.{l}.mlp.c_proj.{r}", "text_model.encoder.layers.{l}.mlp.fc2.{r}"),
    ("text_encoder.transformer.resblocks.{l}.{r}", "text_model.encoder.layers.{l}.{r}"),
    ("text_encoder.transformer.resblocks.{l}", "text_model.encoder.layers.{l}"),
    ("text_encoder.positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("text_encoder.token_embedding.{r}", "text_model.embeddings.token_embedding.{r}"),
    ("text_encoder.ln_final.{r}", "text_model.final_layer_norm.{r}"),
    ("img_projector.linear_out.{r}", "visual_projection.3.{r}"),
    ("img_projector.linear_hidden.{i}.{r}", "visual_projection.{i}.{r}"),
    ("text_projector.linear_out.{r}", "text_projection.3.{r}"),
    ("text_projector.linear_hidden.{i}.{r}", "text_projection.{i}.{r}"),
]


def _name_pattern(template: str) -> re.Pattern:
  parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, ...
  return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{'.+' if p == 'r' else '[^.]+'})"
                            for i, p in enumerate(parts)))


_TO_HF = [(_name_pattern(nvlabs), hf) for nvlabs, hf in _NAME_PAIRS]
_TO_NVLABS = [(_name_pattern(hf), nvlabs) for nvlabs, hf in _NAME_PAIRS]
# Fused q|k|v tensors (rows q, k, v) in NVlabs that HF splits into q_proj/k_proj/v_proj.
_FUSED_NVLABS = [
    (re.compile(r"^img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"),
     "vision_model.encoder.stages.{0}.layers.{1}.self_attn."),
    (re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$"),
     "text_model.encoder.layers.{0}.self_attn."),
]
_FUSED_HF = re.compile(r"^(.*\.layers\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")


def _rename(key: str, rules) -> str:
  for pattern, template in rules:
    m = pattern.fullmatch(key)
    if m:
      return template.format(**m.groupdict())
  return key


def nvlabs_to_hf(state_dict: Mapping[str, np.ndarray]) -> StateDict:
  """Renames an NVlabs state dict to HF GroupViTModel names (HF has no multi-label scale)."""
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key == "multi_label_logit_scale":
      continue
    if "projector.linear" in key and key.endswith("weight") and value.ndim == 3:
      value = value[..., 0]  # Conv1d(k=1) -> Linear.
    for pattern, stem in _FUSED_NVLABS:
      m = pattern.match(key)
      if m:
        stem = stem.format(*m.groups()[:-1])
        for name, part in zip(("q", "k", "v"), np.split(value, 3, axis=0)):
          out[f"{stem}{name}_proj.{m.groups()[-1]}"] = part
        break
    else:
      out[_rename(key, _TO_HF)] = value
  return out


def hf_to_nvlabs(state_dict: Mapping[str, np.ndarray]) -> StateDict:
  """Inverse of `nvlabs_to_hf`: fuses HF's q/k/v projections and renames to NVlabs keys."""
  out: StateDict = {}
  fused: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    if _IGNORED.search(key):
      continue
    m = _FUSED_HF.match(key)
    if m:
      fused.setdefault((m[1], m[3]), {})[m[2]] = np.asarray(value)
    else:
      out[_rename(key, _TO_NVLABS)] = np.asarray(value)
  for (stem, kind), parts in fused.items():
    if set(parts) != {"q", "k", "v"}:
      raise ValueError(f"HF checkpoint has an incomplete q/k/v set under {stem!r}")
    value = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    suffix = f".attn.in_proj_{kind}" if stem.startswith("text_model.") else f".attn.qkv.{kind}"
    out[_rename(stem, _TO_NVLABS) + suffix] = value
  return out


# ---------------------------------------------------------------------------------------------------
# CLIP (models/clip.py, OpenAI's layout) <-> transformers' CLIPModel.
# ---------------------------------------------------------------------------------------------------

# Our path (`/`-joined, parameter last) -> HF name; `{i}` a layer index. Linear kernels are transposed,
# the patch kernel goes HWIO <-> OIHW, the fused q|k|v projection is split into HF's q/k/v_proj.
_CLIP_BLOCK = [
    ("ln_1/{p}", "layer_norm1.{p}"), ("ln_2/{p}", "layer_norm2.{p}"),
    ("attn/out_proj/{p}", "self_attn.out_proj.{p}"), ("mlp/fc1/{p}", "mlp.fc1.{p}"), ("mlp/fc2/{p}", "mlp.fc2.{p}"),
]
_CLIP_PAIRS = [
    ("visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight"),
    ("visual/class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual/positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual/ln_pre/{p}", "vision_model.pre_layrnorm.{p}"),
    ("visual/ln_post/{p}", "vision_model.post_layernorm.{p}"),
    ("visual/proj", "visual_projection.weight"),
    ("text_tower/token_embedding", "text_model.embeddings.token_embedding.weight"),
    ("text_tower/positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("text_tower/ln_final/{p}", "text_model.final_layer_norm.{p}"),
    ("text_projection", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
] + [(f"{tower}/resblocks_{{i}}/{ours}", f"{hf_tower}.encoder.layers.{{i}}.{hf}")
     for tower, hf_tower in (("visual", "vision_model"), ("text_tower", "text_model")) for ours, hf in _CLIP_BLOCK]
_CLIP_PARAM = {"scale": "weight", "kernel": "weight", "bias": "bias"}


def _paired_name(pairs: list[tuple[str, str]], path: str) -> str | None:
  """The other name of our `path` by the first (ours, theirs) pair whose pattern matches it: `{i}` an
  index, `{p}` our parameter name (scale / kernel / bias -> weight / weight / bias)."""
  for ours, theirs in pairs:
    pattern = re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
    m = re.fullmatch(pattern, path)
    if m:
      groups = m.groupdict()
      if "p" in groups:
        groups["p"] = _CLIP_PARAM[groups["p"]]
      return theirs.format(**groups)
  return None


def _clip_hf_name(path: str) -> str | None:
  return _paired_name(_CLIP_PAIRS, path)


def _clip_fused(path: str) -> str | None:
  """The HF stem of a fused q|k|v parameter (`...self_attn.`), else None."""
  m = re.fullmatch(r"(visual|text_tower)/resblocks_(\d+)/attn/in_proj/(kernel|bias)", path)
  if not m:
    return None
  tower = "vision_model" if m[1] == "visual" else "text_model"
  return f"{tower}.encoder.layers.{m[2]}.self_attn."


def clip_hf_to_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]) -> dict[str, Any]:
  """A transformers `CLIPModel` state dict -> our CLIP params shaped like `template` (`{"params": ...}`).

  Raises ValueError naming the first parameter that is missing, unexpected or of the wrong shape.
  """
  state_dict = {k: np.asarray(v) for k, v in state_dict.items() if not _IGNORED.search(k)}
  if not any(k.startswith(("vision_model.", "text_model.")) for k in state_dict):
    raise ValueError(f"not a CLIPModel state dict: no 'vision_model.*'/'text_model.*' tensors "
                     f"(first key: {next(iter(state_dict), '<empty>')!r})")
  flat, used = {}, set()
  for path, leaf in _flat(template["params"]).items():
    name = "/".join(path)
    shape = tuple(leaf.shape)
    stem = _clip_fused(name)
    if stem is not None:
      kind = "weight" if name.endswith("kernel") else "bias"
      keys = [f"{stem}{x}_proj.{kind}" for x in "qkv"]
      missing = [k for k in keys if k not in state_dict]
      if missing:
        raise ValueError(f"checkpoint has no parameter {missing[0]!r} (needed for {name}, shape {shape})")
      value = np.concatenate([state_dict[k] for k in keys], axis=0)
      value = value.T if kind == "weight" else value
      used.update(keys)
    else:
      key = _clip_hf_name(name)
      if key is None or key not in state_dict:
        raise ValueError(f"checkpoint has no parameter {key!r} (needed for {name}, shape {shape})")
      value = state_dict[key]
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
      elif value.ndim == 2 and key.endswith(".weight") and "embedding" not in key:
        value = value.T
      elif shape == () and value.size == 1:
        value = value.reshape(())  # a scalar some writers store as [1]
      used.add(key)
    if value.shape != shape:
      raise ValueError(f"parameter {'/'.join(path)}: checkpoint shape {value.shape} does not fit the config's {shape}")
    flat[path] = value.astype(np.float32)
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    raise ValueError(f"checkpoint parameter {unexpected[0]!r} has no place in the configured CLIP "
                     f"({len(unexpected)} unexpected in all): is the config right?")
  return {"params": flax.traverse_util.unflatten_dict(flat)}


def import_clip(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any]) -> dict[str, Any]:
  """A transformers `CLIPModel` state dict into a model built on CLIP's towers (SegCLIP): every CLIP
  parameter replaced, the rest (the semantic group module, the reconstruction) kept as `variables` has it."""
  params = dict(variables["params"])
  clip_part = {k: v for k, v in params.items() if k in CLIP_PARAMS}
  params.update(clip_hf_to_variables(state_dict, {"params": clip_part})["params"])
  return {**variables, "params": params}


def clip_variables_to_hf(variables: Mapping[str, Any]) -> StateDict:
  """Our CLIP params -> a transformers `CLIPModel` state dict (the inverse of `clip_hf_to_variables`)."""
  out = {}
  for path, value in _flat(variables["params"]).items():
    name = "/".join(path)
    value = np.asarray(value, np.float32)
    stem = _clip_fused(name)
    if stem is not None:
      kind = "weight" if name.endswith("kernel") else "bias"
      parts = np.split(value.T if kind == "weight" else value, 3, axis=0)
      out.update({f"{stem}{x}_proj.{kind}": part for x, part in zip("qkv", parts)})
      continue
    key = _clip_hf_name(name)
    if key is None:
      raise ValueError(f"no CLIPModel name for our parameter {name}")
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2 and key.endswith(".weight") and "embedding" not in key:
      value = value.T
    out[key] = value
  return out


# ---------------------------------------------------------------------------------------------------
# OpenAI's CLIP checkpoint and SegCLIP's release (`segclip.bin`).
# ---------------------------------------------------------------------------------------------------

CLIP_PARAMS = ("visual", "text_tower", "text_projection", "logit_scale")  # our top-level CLIP params
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's state dicts
_OPENAI_BLOCK = [(r"ln_1\.", "layer_norm1."), (r"ln_2\.", "layer_norm2."), (r"attn\.out_proj\.", "self_attn.out_proj."),
                 (r"mlp\.c_fc\.", "mlp.fc1."), (r"mlp\.c_proj\.", "mlp.fc2.")]
_OPENAI_RULES = [
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"logit_scale", "logit_scale"),
]


def openai_clip_to_hf(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> StateDict:
  """OpenAI's CLIP state dict (`visual.transformer.resblocks.<i>...`, `transformer.resblocks.<i>...`,
  `visual.proj`, `text_projection`, ...) -> transformers `CLIPModel` names: the fused attention
  projection split into q/k/v, the two projections transposed. Raises ValueError on a name it does not know
  (named with `prefix`, the file's prefix of these names)."""
  out = {}
  for key, value in state_dict.items():
    if key in _OPENAI_METADATA:
      continue
    value = np.asarray(value)
    if key in ("visual.proj", "text_projection"):
      out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T
      continue
    m = re.fullmatch(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)", key)
    if m:
      tower = "vision_model" if m[1] == "visual.transformer" else "text_model"
      stem, rest = f"{tower}.encoder.layers.{m[2]}.", m[3]
      fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
      if fused:
        for x, part in zip("qkv", np.split(value, 3, axis=0)):
          out[f"{stem}self_attn.{x}_proj.{fused[1]}"] = part
        continue
      for pattern, hf in _OPENAI_BLOCK:
        if re.match(pattern, rest):
          out[stem + re.sub(pattern, hf, rest, count=1)] = value
          break
      else:
        raise ValueError(f"checkpoint parameter {prefix + key!r}: not a parameter of CLIP's blocks")
      continue
    for pattern, hf in _OPENAI_RULES:
      if re.fullmatch(pattern, key):
        out[re.sub(pattern, hf, key)] = value
        break
    else:
      raise ValueError(f"checkpoint parameter {prefix + key!r} has no place in CLIP (OpenAI's names)")
  return out


# Our SegCLIP path (group module, reconstruction) -> the release's name, below `clip.visual.transformer.`
# (`vis_mae_decoder.` is top-level). `{i}` an index, `{p}` scale/bias/kernel -> weight/bias.
_SEGCLIP_PAIRS = [
    ("semantic/semantic_center", "semantic_layer2.semantic_center"),
    ("semantic/cross_att_{i}/in_proj_kernel", "semantic_layer2.cross_att.{i}.attn.in_proj_weight"),
    ("semantic/cross_att_{i}/in_proj_bias", "semantic_layer2.cross_att.{i}.attn.in_proj_bias"),
    ("semantic/cross_att_{i}/out_proj_kernel", "semantic_layer2.cross_att.{i}.attn.out_proj.weight"),
    ("semantic/cross_att_{i}/out_proj_bias", "semantic_layer2.cross_att.{i}.attn.out_proj.bias"),
    ("semantic/cross_att_{i}/ln_x/{p}", "semantic_layer2.cross_att.{i}.ln_x.{p}"),
    ("semantic/cross_att_{i}/ln_k/{p}", "semantic_layer2.cross_att.{i}.ln_k.{p}"),
    ("semantic/cross_att_{i}/ln_2/{p}", "semantic_layer2.cross_att.{i}.ln_2.{p}"),
    ("semantic/cross_att_{i}/mlp/fc1/{p}", "semantic_layer2.cross_att.{i}.mlp.c_fc.{p}"),
    ("semantic/cross_att_{i}/mlp/fc2/{p}", "semantic_layer2.cross_att.{i}.mlp.c_proj.{p}"),
    ("semantic/cross_ln/{p}", "semantic_layer2.cross_ln.{p}"),
    ("semantic/norm/{p}", "semantic_layer2.norm.{p}"),
    ("semantic/k_ln/{p}", "semantic_layer2.k_ln.{p}"),
    ("semantic/k_conv/kernel", "semantic_layer2.k_conv.weight"),
    ("semantic/v_conv/kernel", "semantic_layer2.v_conv.weight"),
    ("semantic/proj_o_ln/{p}", "semantic_layer2.proj_o.ln.{p}"),
    ("semantic/proj_o_mlp/fc1/{p}", "semantic_layer2.proj_o.mlp.fc1.{p}"),
    ("semantic/proj_o_mlp/fc2/{p}", "semantic_layer2.proj_o.mlp.fc2.{p}"),
    ("reconstruct_layer/{p}", "reconstruct_layer2.rec_proj_a.a_fc.{p}"),
    ("mae_blocks_{i}/attn/in_proj/{p}", "layers_mae2.{i}.attn.in_proj_{p}"),
    ("mae_blocks_{i}/attn/out_proj/{p}", "layers_mae2.{i}.attn.out_proj.{p}"),
    ("mae_blocks_{i}/ln_1/{p}", "layers_mae2.{i}.ln_1.{p}"),
    ("mae_blocks_{i}/ln_2/{p}", "layers_mae2.{i}.ln_2.{p}"),
    ("mae_blocks_{i}/mlp/fc1/{p}", "layers_mae2.{i}.mlp.c_fc.{p}"),
    ("mae_blocks_{i}/mlp/fc2/{p}", "layers_mae2.{i}.mlp.c_proj.{p}"),
    ("mae_decoder/embed/{p}", "vis_mae_decoder.decoder_embed.{p}"),
    ("mae_decoder/mask_token", "vis_mae_decoder.mask_token"),
    ("mae_decoder/blocks_{i}/norm1/{p}", "vis_mae_decoder.decoder_blocks.{i}.norm1.{p}"),
    ("mae_decoder/blocks_{i}/norm2/{p}", "vis_mae_decoder.decoder_blocks.{i}.norm2.{p}"),
    ("mae_decoder/blocks_{i}/attn/qkv/{p}", "vis_mae_decoder.decoder_blocks.{i}.attn.qkv.{p}"),
    ("mae_decoder/blocks_{i}/attn/proj/{p}", "vis_mae_decoder.decoder_blocks.{i}.attn.proj.{p}"),
    ("mae_decoder/blocks_{i}/mlp/fc1/{p}", "vis_mae_decoder.decoder_blocks.{i}.mlp.fc1.{p}"),
    ("mae_decoder/blocks_{i}/mlp/fc2/{p}", "vis_mae_decoder.decoder_blocks.{i}.mlp.fc2.{p}"),
    ("mae_decoder/norm/{p}", "vis_mae_decoder.decoder_norm.{p}"),
    ("mae_decoder/pred/{p}", "vis_mae_decoder.decoder_pred.{p}"),
]
# In the release but not built here: the fixed positions of the pixel decoder (computed), and the text
# reconstruction's decoder (SegCLIP's optional masked-caption loss).
_SEGCLIP_SKIPPED = re.compile(r"^(vis_mae_decoder\.decoder_pos_embed|seq_mae_decoder\.)")


def _segclip_name(path: str) -> str | None:
  name = _paired_name(_SEGCLIP_PAIRS, path)
  if name is None or name.startswith("vis_mae_decoder."):
    return name
  return "clip.visual.transformer." + name


def segclip_release_to_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any],
                                 insert_after: int) -> tuple[dict[str, Any], list[str]]:
  """SegCLIP's released state dict (`segclip.bin`: `clip.*` CLIP in OpenAI's layout, blocks split into
  `layers0.<i>` before the group module and `layers2.<j>` after it; `semantic_layer2`,
  `reconstruct_layer2`, `layers_mae2`, `vis_mae_decoder`) -> our SegCLIP variables shaped like `template`.

  Parameters of the reconstruction the config does not build are left out, and the config's that the
  file lacks keep the template's values; both are returned (as our paths / the file's names) in the
  notes. Raises ValueError on a missing group-module or CLIP parameter, a wrong shape or an unknown name.
  """
  sd = {}
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    m = re.fullmatch(r"clip\.visual\.transformer\.layers(0|2)\.(\d+)\.(.+)", key)
    if m:
      index = int(m[2]) + (insert_after if m[1] == "2" else 0)
      key = f"clip.visual.transformer.resblocks.{index}.{m[3]}"
    sd[key] = np.asarray(value)
  params = dict(template["params"])
  clip_sd = {k[len("clip."):]: v for k, v in sd.items()
             if k.startswith("clip.") and not _segclip_module_key(k)}
  clip_part = {k: v for k, v in params.items() if k in CLIP_PARAMS}
  params.update(clip_hf_to_variables(openai_clip_to_hf(clip_sd, "clip."), {"params": clip_part})["params"])
  used, notes = {"clip." + k for k in clip_sd}, []
  flat = {}
  for path, leaf in _flat({k: v for k, v in params.items() if k not in CLIP_PARAMS}).items():
    name = "/".join(path)
    key = _segclip_name(name)
    if key is None:
      raise ValueError(f"our SegCLIP parameter {name} has no name in SegCLIP's release")
    if key not in sd:
      if path[0] == "semantic":
        raise ValueError(f"checkpoint has no parameter {key!r} (needed for {name}, shape {tuple(leaf.shape)})")
      notes.append(f"{name}: not in the file, kept as initialised")
      flat[path] = np.asarray(leaf)
      continue
    value = sd[key]
    used.add(key)
    if name.endswith("_conv/kernel"):  # grouped 1x1 conv [out, in / groups, 1] -> [groups, in, out]
      g = leaf.shape[0]
      value = value.reshape(g, value.shape[0] // g, value.shape[1]).transpose(0, 2, 1)
    elif name.endswith("kernel") and value.ndim == 2:
      value = value.T
    elif name.endswith("mask_token"):
      value = value.reshape(-1)
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"parameter {name}: checkpoint shape {value.shape} does not fit the config's {tuple(leaf.shape)}")
    flat[path] = value.astype(np.float32)
  rest = sorted(k for k in set(sd) - used if not _SEGCLIP_SKIPPED.search(k))
  unknown = [k for k in rest if not _segclip_module_key(k)]
  if unknown:
    raise ValueError(f"checkpoint parameter {unknown[0]!r} has no place in SegCLIP ({len(unknown)} unknown in all)")
  if rest:
    notes.append(f"{len(rest)} reconstruction parameters of the file are not built by this config "
                 f"(model.reconstruction), e.g. {rest[0]}")
  params.update(flax.traverse_util.unflatten_dict(flat))
  return {**template, "params": params}, notes


def _segclip_module_key(key: str) -> bool:
  """Whether a release name belongs to SegCLIP's own modules (not CLIP's towers)."""
  return key.startswith("vis_mae_decoder.") or bool(re.match(
      r"clip\.visual\.transformer\.(semantic_layer2|reconstruct_layer2|layers_mae2)\.", key))


def clip_state_dict_format(state_dict: Mapping[str, Any]) -> str:
  """'hf' (transformers CLIPModel), 'openai' (OpenAI's CLIP) or 'segclip' (SegCLIP's release), by names."""
  keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
  if any(k.startswith("clip.visual.") for k in keys):
    return "segclip"
  if any(k.startswith("visual.") for k in keys):
    return "openai"
  if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
    return "hf"
  raise ValueError(f"not a CLIP or SegCLIP checkpoint: no CLIPModel, OpenAI CLIP or SegCLIP names "
                   f"(first key: {next(iter(state_dict), '<empty>')!r})")


# ---------------------------------------------------------------------------------------------------
# Files and the CLI.
# ---------------------------------------------------------------------------------------------------


def load_state_dict(path: str) -> StateDict:
  """Reads a `.pth`/`.bin` (torch.load with weights_only=True, no code runs) or `.safetensors` file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .pth/.bin files needs torch: pip install 'groupvit-jax[torch]'") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for foreign or corrupt files.
    if "TorchScript" in str(e):  # OpenAI's released CLIP files (ViT-B-16.pt) are TorchScript programs
      raise ValueError(f"{path}: a TorchScript archive, which is not read here (loading it runs its code); save "
                       "its state dict with torch.save(torch.jit.load(path, map_location='cpu').state_dict(), "
                       "'clip_state_dict.pt') and convert that") from None
    raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                     f"{str(e)[:300]})") from None
  for key in ("model", "state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def detect_format(state_dict: Mapping[str, Any]) -> str:
  """'nvlabs' or 'hf', from the key names."""
  if any(k.startswith(("img_encoder.", "text_encoder.")) for k in state_dict):
    return "nvlabs"
  if any(k.startswith(("vision_model.", "text_model.")) for k in state_dict):
    return "hf"
  first = next(iter(state_dict), "<empty>")
  raise ValueError(f"not a GroupViT checkpoint: neither NVlabs nor HF names (first key: {first!r})")


def import_state_dict(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any],
                      fmt: str = "auto") -> dict[str, Any]:
  """NVlabs or HF state dict -> our variables shaped like `template`."""
  fmt = detect_format(state_dict) if fmt == "auto" else fmt
  if fmt == "hf":
    state_dict = hf_to_nvlabs(state_dict)
  elif fmt != "nvlabs":
    raise ValueError(f"format must be 'auto', 'nvlabs' or 'hf', got {fmt!r}")
  return nvlabs_to_variables(state_dict, template)


def export_hf(variables: Mapping[str, Any]) -> StateDict:
  """Our variables -> an HF GroupViTModel state dict (loadable with `load_state_dict`)."""
  return nvlabs_to_hf(variables_to_nvlabs(variables))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from groupvit_jax import checkpoint, config_lib  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  from groupvit_jax.models import variables_template  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(f.config)
  if config.model.get("name", "groupvit") == "lseg":
    _import_lseg(config, f.input, f.output)
    return
  if config.model.get("name", "groupvit") == "segclip":
    if f.export_hf:
      _export_segclip_clip(config, f.checkpoint, f.export_hf)
    else:
      _import_clip_for_segclip(config, f.input, f.output)
    return
  template = variables_template(config.model)
  if f.export_hf:
    if not f.checkpoint:
      raise flags.IllegalFlagValueError("--export_hf needs --checkpoint (a directory written by this tool)")
    variables = checkpoint.load_variables(f.checkpoint, template)
    sd = export_hf(variables)
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, f.export_hf)
    print(f"wrote {len(sd)} tensors in HF GroupViTModel names to {f.export_hf}")
    return
  if not (f.input and f.output):
    raise flags.IllegalFlagValueError("give --input and --output (import) or --checkpoint and --export_hf")
  sd = load_state_dict(f.input)
  variables = import_state_dict(sd, template, f.format)
  checkpoint.save_variables(f.output, variables)
  from groupvit_jax.models import count_params  # pylint: disable=g-import-not-at-top
  print(f"imported {count_params(variables['params']):,} parameters from {f.input} "
        f"({detect_format(sd) if f.format == 'auto' else f.format} format) to {f.output}")


def _import_clip_for_segclip(config: Any, input_path: str, output: str) -> None:
  """CLIP weights (transformers CLIPModel or OpenAI names; the group module from seed 0) or SegCLIP's
  release (`segclip.bin`) into a SegCLIP checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from groupvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import build_model, count_params, random_variables  # pylint: disable=g-import-not-at-top
  if not (input_path and output):
    raise ValueError("a SegCLIP config imports CLIP or SegCLIP weights: give --input (a CLIPModel .safetensors/.bin, "
                     "an OpenAI CLIP state dict or segclip.bin) and --output")
  sd = load_state_dict(input_path)
  fmt = clip_state_dict_format(sd)
  variables = random_variables(build_model(config.model), config.model, jax.random.key(0))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  if fmt == "segclip":
    variables, notes = segclip_release_to_variables(sd, variables, config.model.group.insert_after)
    checkpoint.save_variables(output, variables)
    print(f"imported SegCLIP's {count_params(variables['params']):,} parameters from {input_path} to {output}")
    for note in notes:
      print(f"  {note}")
    return
  variables = import_clip(openai_clip_to_hf(sd) if fmt == "openai" else sd, variables)
  checkpoint.save_variables(output, variables)
  new = count_params({k: v for k, v in variables["params"].items() if k not in CLIP_PARAMS})
  print(f"imported {count_params(variables['params']) - new:,} CLIP parameters ({fmt} names) from {input_path} to "
        f"{output}; the semantic group module's (and the reconstruction's) {new:,} start from seed 0")


def _import_lseg(config: Any, input_path: str, output: str) -> None:
  """LSeg's released checkpoint (models/convert_lseg.py) into an LSeg checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from groupvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import build_model, convert_lseg, count_params, random_variables  # pylint: disable=g-import-not-at-top
  if not (input_path and output):
    raise ValueError("an LSeg config imports LSeg's released weights: give --input (its .ckpt / state dict) and --output")
  variables = random_variables(build_model(config.model), config.model, jax.random.key(0))
  variables, notes = convert_lseg.release_to_variables(load_state_dict(input_path), variables)
  checkpoint.save_variables(output, variables)
  print(f"imported LSeg's {count_params(variables['params']):,} parameters from {input_path} to {output}")
  for note in notes:
    print(f"  {note}")


def _export_segclip_clip(config: Any, checkpoint_dir: str, path: str) -> None:
  """A SegCLIP checkpoint's CLIP towers in transformers CLIPModel names (the group module has none)."""
  from groupvit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if not checkpoint_dir:
    raise ValueError("--export_hf needs --checkpoint (a SegCLIP checkpoint directory or training workdir)")
  variables = checkpoint.load_model_variables(checkpoint_dir, config.model)
  clip_part = {k: v for k, v in variables["params"].items() if k in CLIP_PARAMS}
  sd = clip_variables_to_hf({"params": clip_part})
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
  print(f"wrote {len(sd)} tensors of CLIP's towers in CLIPModel names to {path} (the semantic group module "
        f"has no place there)")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "Config file (path[:arg]) whose model the weights must fit.",
                      required=True)
  flags.DEFINE_string("input", None, "NVlabs .pth or HF .bin/.safetensors file to import.")
  flags.DEFINE_enum("format", "auto", ["auto", "nvlabs", "hf"], "Naming of --input.")
  flags.DEFINE_string("output", None, "Directory for the imported Orbax checkpoint.")
  flags.DEFINE_string("checkpoint", None, "Our checkpoint directory to export.")
  flags.DEFINE_string("export_hf", None, "Write an HF-loadable .safetensors here.")


if __name__ == "__main__":
  from groupvit_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
