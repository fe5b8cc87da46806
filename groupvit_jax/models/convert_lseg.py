"""LSeg's released checkpoint (isl-org/lang-seg, a PyTorch Lightning `state_dict` under `net.`) -> our LSeg.

The mapping (reference name -> ours; Linear weights transposed, convolutions OIHW -> HWIO):
- `pretrained.model.patch_embed.proj`, `.cls_token`, `.pos_embed` -> `backbone/patch_embed`, `cls_token`,
  `pos_embed`; `pretrained.model.blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}` ->
  `backbone/blocks_<i>/...` (timm's names are ours). timm's final `norm` and classifier `head`, and the
  blocks after the last hook, do not reach LSeg's output: left out, and reported.
- `pretrained.act_postprocess<n>.0.project.0` -> `reassemble_<n-1>/readout`; `.3` (1x1 convolution) ->
  `reassemble_<n-1>/project`; `.4` (the resampling: ConvTranspose2d [in, out, kh, kw] -> `resample/kernel`
  [kh, kw, in, out], or the stride-2 Conv2d) -> `reassemble_<n-1>/resample`; `scratch.layer<n>_rn` ->
  `reassemble_<n-1>/layer_rn`.
- `scratch.refinenet<n>.{resConfUnit<u>.conv<k>, resConfUnit<u>.bn<k>, out_conv}` -> `refinenet<n>/...`
  (BatchNorm running_mean / running_var -> batch_stats mean / var).
- `scratch.head1` -> `head1`; `scratch.head_block.depthwise.depthwise` -> `head_block/depthwise`.
- `clip_pretrained.*` (OpenAI CLIP): its text tower -> `text_encoder` + `text_projection` (through
  `convert.openai_clip_to_hf`); its image tower and logit scale are unused by LSeg: left out, and reported.
"""

import re
from typing import Any, Mapping

import flax
import numpy as np

from groupvit_jax.models import convert

_PAIRS = [
    ("backbone/patch_embed/kernel", "pretrained.model.patch_embed.proj.weight"),
    ("backbone/patch_embed/bias", "pretrained.model.patch_embed.proj.bias"),
    ("backbone/cls_token", "pretrained.model.cls_token"),
    ("backbone/pos_embed", "pretrained.model.pos_embed"),
    ("backbone/blocks_{i}/{m}/{p}", "pretrained.model.blocks.{i}.{m}.{p}"),
    ("reassemble_{n}/readout/{p}", "pretrained.act_postprocess{n1}.0.project.0.{p}"),
    ("reassemble_{n}/project/{p}", "pretrained.act_postprocess{n1}.3.{p}"),
    ("reassemble_{n}/resample/{p}", "pretrained.act_postprocess{n1}.4.{p}"),
    ("reassemble_{n}/layer_rn/{p}", "scratch.layer{n1}_rn.{p}"),
    ("refinenet{k}/{m}/{p}", "scratch.refinenet{k}.{m}.{p}"),
    ("head1/{p}", "scratch.head1.{p}"),
    ("head_block/depthwise/{p}", "scratch.head_block.depthwise.depthwise.{p}"),
]
_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_UNUSED = re.compile(r"^pretrained\.model\.(norm|head|fc_norm)\.")


def reference_name(path: str, collection: str = "params") -> str | None:
  """Our `/`-joined LSeg path -> the reference's state-dict name (None for the text tower's parts)."""
  for ours, theirs in _PAIRS:
    pattern = (re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>\d+)")
               .replace(r"\{k\}", r"(?P<k>\d+)").replace(r"\{m\}", r"(?P<m>[\w/]+)").replace(r"\{p\}", r"(?P<p>\w+)"))
    m = re.fullmatch(pattern, path)
    if m:
      g = m.groupdict()
      if "p" in g:
        g["p"] = _PARAM[g["p"]]
      if "n" in g:
        g["n1"] = int(g["n"]) + 1
      if "m" in g:
        g["m"] = g["m"].replace("/", ".")
      return theirs.format(**g)
  return None


def _to_ours(value: np.ndarray, path: str, name: str) -> np.ndarray:
  # The upsampling levels' resample is a ConvTranspose2d (kernel = stride: 2, 4 or 8), [in, out, kh, kw] ->
  # [kh, kw, in, out]; the downsampling level's is a 3x3 Conv2d.
  if value.ndim == 4 and path.endswith("resample/kernel") and value.shape[-1] != 3:
    return value.transpose(2, 3, 0, 1)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2 and name.endswith(".weight"):
    return value.T
  return value


def release_to_variables(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], list[str]]:
  """LSeg's state dict (`net.` prefix optional) -> our variables shaped like `template`
  (`{"params", "batch_stats"}`), and notes on what was left out.

  Raises ValueError naming the first parameter that is missing, unexpected or of the wrong shape.
  """
  sd = {(k[len("net."):] if k.startswith("net.") else k): np.asarray(v) for k, v in state_dict.items()}
  sd = {k: v for k, v in sd.items() if not convert._IGNORED.search(k)}  # pylint: disable=protected-access
  if not any(k.startswith("scratch.") for k in sd):
    raise ValueError(f"not an LSeg checkpoint: no 'scratch.*' tensors (first key: {next(iter(sd), '<empty>')!r})")
  out, used = {}, set()
  params = dict(template["params"])
  text_part = {"text_tower": params.pop("text_encoder"), "text_projection": params.pop("text_projection", None)}
  if text_part["text_projection"] is None:
    raise ValueError("LSeg's release has CLIP's text tower: the config needs model.text.layout = 'clip'")
  for collection, tree in (("params", params), ("batch_stats", template.get("batch_stats", {}))):
    flat = {}
    for path, leaf in convert._flat(tree).items():  # pylint: disable=protected-access
      name = reference_name("/".join(path), collection)
      shape = tuple(leaf.shape)
      if name is None or name not in sd:
        raise ValueError(f"checkpoint has no parameter {name!r} (needed for {'/'.join(path)}, shape {shape})")
      value = _to_ours(sd[name], "/".join(path), name)
      if value.shape != shape:
        raise ValueError(f"parameter {name!r}: checkpoint shape {sd[name].shape} does not fit the config's {shape} "
                         f"(ours: {'/'.join(path)})")
      flat[path] = value.astype(np.float32)
      used.add(name)
    out[collection] = flax.traverse_util.unflatten_dict(flat)
  clip_sd = {k[len("clip_pretrained."):]: v for k, v in sd.items() if k.startswith("clip_pretrained.")}
  text_names = {k: v for k, v in clip_sd.items() if not k.startswith("visual.") and k != "logit_scale"}
  hf = convert.openai_clip_to_hf(text_names, prefix="clip_pretrained.")
  text = convert.clip_hf_to_variables(hf, {"params": text_part})["params"]
  out["params"]["text_encoder"] = text["text_tower"]
  out["params"]["text_projection"] = text["text_projection"]
  used.update(f"clip_pretrained.{k}" for k in text_names)
  unused_clip = sorted(k for k in sd if k.startswith("clip_pretrained.") and k not in used)
  unused_vit = sorted(k for k in sd if k not in used and not k.startswith("clip_pretrained.")
                      and (_UNUSED.match(k) or re.match(r"pretrained\.model\.blocks\.\d+\.", k)))
  unexpected = sorted(set(sd) - used - set(unused_clip) - set(unused_vit))
  if unexpected:
    raise ValueError(f"checkpoint parameter {unexpected[0]!r} has no place in the configured LSeg "
                     f"({len(unexpected)} unexpected in all): is the config right?")
  notes = []
  if unused_clip:
    notes.append(f"left out {len(unused_clip)} tensors of CLIP's image tower and logit scale (LSeg uses only "
                 "CLIP's text tower)")
  if unused_vit:
    notes.append(f"left out {len(unused_vit)} tensors of the ViT that do not reach LSeg's output (its final norm, "
                 "classifier head, blocks after the last hook)")
  return out, notes
