"""Analytic FLOP count of GroupViT: the matrix products of one forward pass, per image.

One multiply-add is 2 FLOPs. Only matrix products are counted (dense layers, attention scores and
their weighted sums, the contrastive logits); layer norms, activations, softmaxes and the gumbel
noise are left out, as is usual for model FLOP utilisation (MFU). A training step costs three forward
passes: the backward pass computes two products per forward product (the gradient with respect to
the input and to the weight). For GroupViT-S this gives 42.2 GFLOP per training image with a
caption and 3 prompts of 77 tokens as the reference computes it (32.6 with the prompts at 24 tokens,
`input.prompt_length`); ours, whose text tower's last block computes the EOT token alone (the only
output read), 41.1 and 32.1. XLA's own count of the compiled step, which also counts the elementwise
work, is within a few percent of it (`benchmarks/train_step.py` prints both).

Per image, with width D, MLP ratio r, T tokens in a transformer block:
  block:            2 T D^2 (4 + 2r)     qkv + output projection + MLP
                    + 4 T^2 D            scores and weighted sum
  grouping block:   token-mixing MLP G -> D/2 -> O; cross-attention block from the O outputs to
                    the N image tokens (projections, attention, MLP 4D); single-head assignment
                    attention (projections, scores, weighted sum); channel MLP 4D on the outputs.
"""

from typing import Any


def _block(tokens: int, dim: int, mlp_ratio: float, keys: int | None = None) -> float:
  """Self-attention block (keys = tokens) or, with `keys`, the cross-attention part's products."""
  keys = tokens if keys is None else keys
  if keys == tokens:
    projections = 2 * tokens * dim * dim * 4
  else:  # q and out projection on the queries, k and v on the keys
    projections = 2 * tokens * dim * dim * 2 + 2 * keys * dim * dim * 2
  attention = 4 * tokens * keys * dim
  mlp = 2 * tokens * dim * int(dim * mlp_ratio) * 2
  return projections + attention + mlp


def _token_mlp(tokens_in: int, hidden: int, tokens_out: int, dim: int) -> float:
  return 2 * dim * (tokens_in * hidden + hidden * tokens_out)


def image_tower(image: Any) -> dict[str, float]:
  """Forward FLOPs per image of the image tower, by part."""
  d, r = image.dim, image.mlp_ratio
  n = (image.image_size // image.patch_size) ** 2
  out = {"patch_embed": 2 * n * 3 * image.patch_size**2 * d}
  prev_groups = 0
  for i, depth in enumerate(image.depths):
    g = image.num_group_tokens[i]
    stage = 0.0
    if prev_groups and g:
      stage += _token_mlp(prev_groups, d // 2, g, d)                       # group projector
    stage += depth * _block(n + g, d, r)
    if g and i < len(image.depths) - 1:
      o = image.num_output_groups[i]
      stage += _token_mlp(g, d // 2, o, d)                                 # mlp_inter
      stage += _block(o, d, 4.0, keys=n)                                   # pre_assign_attn
      stage += 2 * o * d * d * 2 + 2 * n * d * d * 2 + 4 * o * n * d       # assignment attention
      stage += 2 * o * d * 4 * d * 2                                       # mlp_channels
      n = o
    out[f"stage_{i}"] = stage
    prev_groups = g
  return out


def segclip_image_tower(image: Any, group: Any, embed_dim: int) -> dict[str, float]:
  """Forward FLOPs per image of SegCLIP's image tower (CLIP's ViT with the semantic group module), by part."""
  w, n, g = image.width, (image.image_size // image.patch_size) ** 2, group.num_groups
  k = group.insert_after
  cross = group.get("cross_layers", 2) * _block(g, w, 4.0, keys=g + n)
  kv = 2 * 2 * n * w * (w // image.heads)                                   # grouped k and v convolutions
  assign = 2 * 2 * g * n * w                                                # logits and region sums
  return {"patch_embed": 2 * n * 3 * image.patch_size**2 * w,
          "blocks_before": k * _block(n, w, 4.0),
          "semantic_group": cross + kv + assign + 2 * g * w * 4 * w * 2,
          "blocks_after": (image.layers - k) * _block(g, w, 4.0),
          "image_projection": 2 * w * embed_dim}


def _eot_block(tokens: int, dim: int, mlp_ratio: float) -> float:
  """The text tower's last block as ours computes it, for the EOT token's output alone: q|k|v on every
  token, then scores, weighted sum, output projection and MLP for that one query."""
  return 2 * tokens * dim * dim * 3 + 4 * tokens * dim + 2 * dim * dim + 2 * dim * int(dim * mlp_ratio) * 2


def text_tower(text: Any, length: int, full_last_block: bool = False) -> float:
  """Forward FLOPs of the text transformer for one sequence of `length` tokens; `full_last_block`
  counts the last block on every token, as the reference computes it."""
  last = _block(length, text.width, 4.0) if full_last_block else _eot_block(length, text.width, 4.0)
  return (text.layers - 1) * _block(length, text.width, 4.0) + last


def projector(in_dim: int, hidden: int, out: int, layers: int) -> float:
  """ProjectMLP: in -> hidden (x layers - 1) -> out; none with 0 layers."""
  widths = [in_dim] + [hidden] * (layers - 1) + [out] if layers else []
  return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def forward_flops(model: Any, text_length: int, num_prompts: int = 0, batch_size: int = 1,
                  prompt_length: int | None = None, full_last_block: bool = False) -> dict[str, float]:
  """Forward FLOPs per image, by part: the image tower's stages, the text tower on the caption and
  `num_prompts` prompts (at `prompt_length` tokens, default `text_length`), the projectors and the
  loss logits against a batch of `batch_size`. `full_last_block`: the reference's text tower (see
  text_tower)."""
  texts = 1 + num_prompts
  text = lambda length: text_tower(model.text, length, full_last_block)
  if model.get("name", "groupvit") == "segclip":
    parts = segclip_image_tower(model.image, model.group, model.projection_dim)
    parts["text_tower"] = text(text_length) + num_prompts * text(prompt_length or text_length)
    parts["text_projection"] = texts * 2 * model.text.width * model.projection_dim
    parts["logits"] = 2 * batch_size * texts * model.projection_dim
    parts["total"] = sum(parts.values())
    return parts
  parts = image_tower(model.image)
  parts["image_projector"] = projector(model.image.dim, model.projection_hidden_dim, model.projection_dim,
                                       model.projection_layers)
  parts["text_tower"] = text(text_length) + num_prompts * text(prompt_length or text_length)
  parts["text_projector"] = texts * projector(model.text.width, model.projection_hidden_dim,
                                              model.projection_dim, model.projection_layers)
  out_dim = model.projection_dim if model.projection_layers else model.image.dim
  parts["logits"] = 2 * batch_size * texts * out_dim
  parts["total"] = sum(parts.values())
  return parts


def train_step_flops(model: Any, text_length: int, num_prompts: int = 0, batch_size: int = 1,
                     prompt_length: int | None = None, full_last_block: bool = False) -> float:
  """FLOPs per image of one training step (forward + backward = 3 forward passes)."""
  parts = forward_flops(model, text_length, num_prompts, batch_size, prompt_length, full_last_block)
  return 3 * parts["total"]
