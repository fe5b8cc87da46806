"""CLIP's towers against transformers' CLIPModel (random weights, fp32), and the weights' round trip."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from groupvit_jax.models import convert
from groupvit_jax.models.clip import CLIP

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = {
  # name: (image size, patch, vision width, layers, heads, text width, layers, heads, context, embed dim)
  "tiny": (32, 8, 64, 2, 4, 32, 2, 4, 16, 24),
  "B/16": (224, 16, 768, 12, 12, 512, 12, 8, 77, 512),
}


def _hf_model(size):
  image, patch, vw, vl, vh, tw, tl, th, ctx, dim = SIZES[size]
  config = transformers.CLIPConfig(
      vision_config=dict(image_size=image, patch_size=patch, hidden_size=vw, num_hidden_layers=vl,
                         num_attention_heads=vh, intermediate_size=4 * vw),
      text_config=dict(vocab_size=49408, hidden_size=tw, num_hidden_layers=tl, num_attention_heads=th,
                       intermediate_size=4 * tw, max_position_embeddings=ctx, eos_token_id=49407),
      projection_dim=dim)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # LayerNorms and biases away from their 1 / 0 initialisation
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ours(size):
  image, patch, vw, vl, vh, tw, tl, th, ctx, dim = SIZES[size]
  return CLIP(vision=dict(image_size=image, patch_size=patch, width=vw, layers=vl, heads=vh),
              text=dict(context_length=ctx, vocab_size=49408, width=tw, layers=tl, heads=th), embed_dim=dim)


def _converted(size):
  """(HF model, its state dict, our model, our variables' shapes)."""
  hf = _hf_model(size)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  model = _ours(size)
  image, ctx = SIZES[size][0], SIZES[size][8]
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)),
                                               jnp.zeros((1, ctx), jnp.int32)))
  return hf, sd, model, template


def _inputs(size, batch=2, image=None):
  rng = np.random.RandomState(0)
  image = image or SIZES[size][0]
  ctx = SIZES[size][8]
  images = rng.randn(batch, image, image, 3).astype(np.float32)
  ids = np.zeros((batch, ctx), np.int64)
  for b in range(batch):
    n = 3 + 2 * b
    ids[b, 0] = 49406
    ids[b, 1:n] = rng.randint(1, 49000, n - 1)
    ids[b, n] = 49407
  return images, ids


@pytest.mark.parametrize("size", ["tiny", "B/16"])
def test_towers_match_transformers_clip(size):
  hf, sd, model, template = _converted(size)
  variables = convert.clip_hf_to_variables(sd, template)
  images, ids = _inputs(size)
  with torch.no_grad():
    want_img = hf.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    want_txt = hf.get_text_features(input_ids=torch.from_numpy(ids))
  want_img = getattr(want_img, "pooler_output", want_img).numpy()
  want_txt = getattr(want_txt, "pooler_output", want_txt).numpy()
  got_img = model.apply(variables, images, method=CLIP.encode_image)
  got_txt = model.apply(variables, ids.astype(np.int32), method=CLIP.encode_text)
  np.testing.assert_allclose(got_img, want_img, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got_txt, want_txt, atol=1e-4, rtol=0)
  # HF -> ours -> HF is exact.
  back = convert.clip_variables_to_hf(variables)
  expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  assert sorted(back) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_other_image_sizes_resize_the_positions_as_transformers():
  hf, sd, model, template = _converted("tiny")
  variables = convert.clip_hf_to_variables(sd, template)
  images, _ = _inputs("tiny", image=48)
  with torch.no_grad():
    out = hf.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
    want = hf.visual_projection(out.pooler_output).numpy()
  got = model.apply(variables, images, method=CLIP.encode_image)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_a_state_dict_that_does_not_fit_is_named():
  _, sd, _, template = _converted("tiny")
  with pytest.raises(ValueError, match=r"no parameter 'text_projection.weight'"):
    convert.clip_hf_to_variables({k: v for k, v in sd.items() if k != "text_projection.weight"}, template)
  with pytest.raises(ValueError, match=r"not a CLIPModel state dict"):
    convert.clip_hf_to_variables({"img_encoder.x": np.zeros(1)}, template)


def openai_names(hf_sd):
  """transformers CLIPModel tensors renamed to OpenAI's CLIP layout (clip/model.py: `visual.*`,
  `transformer.resblocks.<i>.attn.in_proj_weight` fusing q|k|v by rows, `visual.proj` and
  `text_projection` as [width, embed]), plus the ints OpenAI's state dicts carry."""
  out = {"input_resolution": np.array(32), "context_length": np.array(16), "vocab_size": np.array(49408)}
  fixed = {
      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
      "vision_model.embeddings.class_embedding": "visual.class_embedding",
      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
      "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
      "text_model.embeddings.position_embedding.weight": "positional_embedding",
      "logit_scale": "logit_scale"}
  for key, value in hf_sd.items():
    if key.endswith("position_ids"):
      continue
    if key in fixed:
      out[fixed[key]] = value
    elif key in ("visual_projection.weight", "text_projection.weight"):
      out["visual.proj" if key.startswith("visual") else "text_projection"] = value.T
    elif ".pre_layrnorm." in key or ".post_layernorm." in key or ".final_layer_norm." in key:
      stem = {"pre_layrnorm": "visual.ln_pre", "post_layernorm": "visual.ln_post",
              "final_layer_norm": "ln_final"}[key.split(".")[1]]
      out[f"{stem}.{key.split('.')[-1]}"] = value
    else:
      tower, _, _, i, *rest = key.split(".")
      stem = f"{'visual.transformer' if tower == 'vision_model' else 'transformer'}.resblocks.{i}."
      rest = ".".join(rest)
      if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        kind = rest.split(".")[-1]
        if rest.startswith("self_attn.q_proj"):
          parts = [hf_sd[f"{tower}.encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
          out[f"{stem}attn.in_proj_{kind}"] = np.concatenate(parts, axis=0)
        continue
      rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
              .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
      out[stem + rest] = value
  return out


def test_openai_clip_names_give_the_same_weights():
  """OpenAI's state dict layout (what `torch.jit.load(ViT-B-16.pt).state_dict()` holds) reads as the very
  CLIPModel tensors it was renamed from."""
  _, sd, _, _ = _converted("tiny")
  openai = openai_names(sd)
  assert convert.clip_state_dict_format(openai) == "openai"
  back = convert.openai_clip_to_hf(openai)
  expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  assert sorted(back) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  with pytest.raises(ValueError, match="visual.transformer.resblocks.0.attn.bogus"):
    convert.openai_clip_to_hf({**openai, "visual.transformer.resblocks.0.attn.bogus": np.zeros(1)})
