"""Parity with HF transformers' GroupViTModel (PyTorch), through both import paths (HF and NVlabs names).

Random weights (BatchNorm running statistics included), eval mode, fp32 at highest matmul precision.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from groupvit_jax import config_lib, models
from groupvit_jax.models import build_model, convert
from groupvit_jax.models.groupvit import l2_normalize
from tests.models import hf_reference

TOL = 1e-4
CONFIGS = {"tiny": "configs/tiny.py", "groupvit_s": "configs/groupvit_s.py"}


def _inputs(model_cfg, batch: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  size = model_cfg.image.image_size
  images = rng.randn(batch, 3, size, size).astype(np.float32)
  vocab, ctx = model_cfg.text.vocab_size, model_cfg.text.context_length
  text = np.zeros((batch, ctx), np.int64)
  for i in range(batch):
    n = rng.randint(1, ctx - 1)
    text[i, 0] = vocab - 2  # SOT
    text[i, 1:n + 1] = rng.randint(1, vocab - 2, size=n)
    text[i, n + 1] = vocab - 1  # EOT: the largest id, where the feature is read.
  return images, text


@functools.lru_cache(maxsize=None)
def _case(name: str):
  """Runs the HF reference once per config; returns everything the tests compare."""
  config = config_lib.load_config(CONFIGS[name])
  config.model.dtype = "float32"  # groupvit_s.py trains in bf16; parity is checked in fp32
  hf = hf_reference.random_hf_model(config.model, seed=1)
  images, text = _inputs(config.model, batch=4 if name == "tiny" else 2)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(text), pixel_values=torch.from_numpy(images), output_attentions=True)
  ref = {
      "image_embeds": out.image_embeds.numpy(),
      "text_embeds": out.text_embeds.numpy(),
      "logits_per_image": out.logits_per_image.numpy(),
      "logits_per_text": out.logits_per_text.numpy(),
      "group_tokens": out.vision_model_output.last_hidden_state.numpy(),
      "soft": [a.numpy() for a in out.vision_model_output.attentions],
  }
  return config, hf_reference.state_dict_numpy(hf), images, text, ref


def _ours(config, variables, images, text):
  model = build_model(config.model)

  @jax.jit
  def run(variables, images, text):
    img = model.apply(variables, images, method=model.encode_image)
    txt = model.apply(variables, text, method=model.encode_text)
    image_embeds, text_embeds = l2_normalize(img["image_embeds"]), l2_normalize(txt)
    scale = jnp.exp(variables["params"]["logit_scale"])
    logits = scale * image_embeds @ text_embeds.T
    return {"image_embeds": image_embeds, "text_embeds": text_embeds, "logits_per_image": logits,
            "logits_per_text": logits.T, "group_tokens": img["tokens"],
            "soft": [a["soft"] for a in img["assignments"]], "hard": [a["hard"] for a in img["assignments"]]}

  return jax.device_get(run(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(text, jnp.int32)))


def _check(ours, ref, report):
  for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "group_tokens"):
    err = float(np.abs(ours[key] - ref[key]).max())
    report[key] = err
    assert err <= TOL, f"{key}: max abs diff {err:.3g} > {TOL}"
  for stage, (soft, ref_soft, hard) in enumerate(zip(ours["soft"], ref["soft"], ours["hard"])):
    err = float(np.abs(soft - ref_soft).max())
    report[f"soft_stage{stage + 1}"] = err
    assert err <= TOL, f"stage {stage + 1} soft assignment: max abs diff {err:.3g} > {TOL}"
    # Hard maps: one-hot of each token's best group; compare with the reference's argmax.
    assert np.all(hard.sum(axis=1) == 1.0) and np.all((hard == 0) | (hard == 1))
    ours_idx, ref_idx = hard.argmax(axis=1), ref_soft.argmax(axis=1)
    agree = float(np.mean(ours_idx == ref_idx))
    report[f"hard_agree_stage{stage + 1}"] = agree
    assert agree >= 0.999, f"stage {stage + 1}: hard assignments agree on {agree:.4%} of tokens"
    top2 = np.sort(ref_soft, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert np.array_equal(ours_idx[clear], ref_idx[clear]), "hard assignment differs where the margin is clear"


@pytest.mark.parametrize("name", ["tiny", "groupvit_s"])
@pytest.mark.parametrize("path", ["hf", "nvlabs"])
def test_parity_with_hf_groupvit(name, path, record_property):
  config, sd, images, text, ref = _case(name)
  if path == "nvlabs":
    sd = hf_reference.hf_to_nvlabs_reference(sd)
  variables = convert.import_state_dict(sd, models.variables_template(config.model), fmt=path)
  ours = _ours(config, variables, images, text)
  report = {}
  _check(ours, ref, report)
  for key, value in report.items():
    record_property(key, value)
  print(f"\nparity {name} via {path}: " + ", ".join(f"{k}={v:.2e}" for k, v in report.items()))
