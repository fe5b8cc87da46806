"""HF transformers' GroupViTModel as the PyTorch reference, configured like one of our configs."""

import numpy as np
import torch
from transformers import GroupViTConfig, GroupViTModel


def hf_config(model_cfg) -> GroupViTConfig:
  """Our `config.model` -> the matching HF GroupViTConfig."""
  img, txt = model_cfg.image, model_cfg.text
  if len(set(img.num_heads)) != 1:
    raise ValueError("HF GroupViT uses one head count for all stages")
  return GroupViTConfig(
      text_config=dict(vocab_size=txt.vocab_size, hidden_size=txt.width, intermediate_size=4 * txt.width,
                       num_hidden_layers=txt.layers, num_attention_heads=txt.heads,
                       max_position_embeddings=txt.context_length, eos_token_id=txt.vocab_size - 1,
                       bos_token_id=txt.vocab_size - 2),
      vision_config=dict(hidden_size=img.dim, intermediate_size=int(img.mlp_ratio * img.dim),
                         depths=list(img.depths), num_hidden_layers=sum(img.depths),
                         num_group_tokens=list(img.num_group_tokens),
                         num_output_groups=list(img.num_output_groups) + [img.num_output_groups[-1]],
                         num_attention_heads=img.num_heads[0], image_size=img.image_size,
                         patch_size=img.patch_size),
      projection_dim=model_cfg.projection_dim,
      projection_intermediate_dim=model_cfg.projection_hidden_dim)


def random_hf_model(model_cfg, seed: int = 0) -> GroupViTModel:
  """An HF GroupViTModel in eval mode with every tensor randomised, BatchNorm statistics included."""
  torch.manual_seed(seed)
  model = GroupViTModel(hf_config(model_cfg)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point() or name == "logit_scale":
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif name.endswith("running_mean") or name.endswith("bias"):
        tensor.copy_(0.1 * noise)
      elif "norm" in name and name.endswith("weight") or name.endswith("projection.1.weight"):
        tensor.copy_(1.0 + 0.1 * noise)  # LayerNorm / BatchNorm scales.
      else:
        tensor.add_(0.02 * noise)  # Keeps the init's scale; group tokens stop being zero.
  return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_to_nvlabs_reference(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of HF's `convert_groupvit_nvlab_to_hf.py` renames, written out for the test.

  Kept separate from groupvit_jax.models.convert so the NVlabs import path is checked against an
  independent statement of the official names.
  """
  out = {}
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for key, value in sd.items():
    if key.endswith(("position_ids", "num_batches_tracked")):
      continue
    k = key
    for hf, nv in [("vision_model.embeddings.patch_embeddings.projection", "img_encoder.patch_embed.proj"),
                   ("vision_model.embeddings.layernorm", "img_encoder.patch_embed.norm"),
                   ("vision_model.embeddings.position_embeddings", "img_encoder.pos_embed"),
                   ("vision_model.layernorm", "img_encoder.norm"),
                   ("vision_model.encoder.stages", "img_encoder.layers"),
                   ("text_model.encoder.layers", "text_encoder.transformer.resblocks"),
                   ("text_model.embeddings.position_embedding.weight", "text_encoder.positional_embedding"),
                   ("text_model.embeddings.token_embedding", "text_encoder.token_embedding"),
                   ("text_model.final_layer_norm", "text_encoder.ln_final"),
                   ("pre_assign_attn.attn.out_proj", "pre_assign_attn.attn.proj")]:
      k = k.replace(hf, nv)
    if k.startswith("img_encoder.layers."):
      parts = k.split(".")
      if parts[3] == "layers":  # img_encoder.layers.I.layers.J.* -> blocks
        parts[3] = "blocks"
        rest = ".".join(parts[5:])
        rest = rest.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
        rest = rest.replace("self_attn.out_proj", "attn.proj")
        k = ".".join(parts[:5]) + "." + rest
        if "self_attn." in k:
          stem, proj, kind = k.rsplit(".", 2)
          qkv.setdefault(stem.replace("self_attn", "attn.qkv") + "." + kind, {})[proj[0]] = value
          continue
    if k.startswith("text_encoder.transformer"):
      k = k.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
      k = k.replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
      k = k.replace("self_attn.out_proj", "attn.out_proj")
      if ".self_attn." in k:
        stem, proj, kind = k.rsplit(".", 2)
        qkv.setdefault(stem.replace("self_attn", "attn.in_proj_") + kind, {})[proj[0]] = value
        continue
    for side, hf_name in (("img", "visual_projection"), ("text", "text_projection")):
      if k.startswith(hf_name + "."):
        idx, kind = k.split(".")[1:]
        if idx == "3":
          k = f"{side}_projector.linear_out.{kind}"
        else:
          k = f"{side}_projector.linear_hidden.{idx}.{kind}"
        if idx in ("0", "3") and kind == "weight":
          value = value[..., None]  # NVlabs projectors are Conv1d(kernel_size=1).
    out[k.replace("attn.in_proj_.", "attn.in_proj_")] = value
  for k, parts in qkv.items():
    out[k.replace("attn.in_proj_.", "attn.in_proj_")] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  out["multi_label_logit_scale"] = sd["logit_scale"].copy()
  return out
