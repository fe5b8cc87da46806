"""SegCLIP's semantic group module against its definition computed here in numpy, and the model's outputs."""

import numpy as np
import pytest

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models.segclip import SegCLIP, SemanticGroup


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(x, axis):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _mha(q, k, v, heads):
  b, n, c = q.shape
  d = c // heads
  split = lambda t: t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
  w = _softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d), -1)
  return (w @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, c)


def _mlp(x, p, act):
  return act(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]


quick_gelu = lambda x: x / (1 + np.exp(-1.702 * x))
erf = np.vectorize(__import__("math").erf)
gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _grouped(x, kernel):
  """A grouped 1x1 convolution as torch's Conv1d(groups=g) weight [C, C/g, 1] would compute it."""
  g, per, _ = kernel.shape
  weight = np.zeros((g * per, per))  # torch layout [out, in / groups]
  for gi in range(g):
    weight[gi * per:(gi + 1) * per] = kernel[gi].T
  out = np.zeros_like(x)
  for o in range(g * per):
    gi = o // per
    out[..., o] = x[..., gi * per:(gi + 1) * per] @ weight[o]
  return out


def semantic_group_by_definition(p, x, heads, cross_layers):
  """SegCLIP's SemanticLearnerModule at evaluation, from its definition (numpy, float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, _, c = x.shape
  q = np.broadcast_to(p["semantic_center"], (b,) + p["semantic_center"].shape)
  for i in range(cross_layers):
    blk = p[f"cross_att_{i}"]
    kv = np.concatenate([q, x], axis=1)
    wq, wk, wv = np.split(blk["in_proj_kernel"], 3, axis=1)
    bq, bk, bv = np.split(blk["in_proj_bias"], 3)
    xq, m = _ln(q, blk["ln_x"]), _ln(kv, blk["ln_k"])
    q = q + _mha(xq @ wq + bq, m @ wk + bk, m @ wv + bv, heads) @ blk["out_proj_kernel"] + blk["out_proj_bias"]
    q = q + _mlp(_ln(q, blk["ln_2"]), blk["mlp"], quick_gelu)
  q = _ln(q, p["cross_ln"])
  normed = _ln(x, p["norm"])
  k = _ln(_grouped(normed, p["k_conv"]["kernel"]), p["k_ln"])
  v = _grouped(normed, p["v_conv"]["kernel"])
  logits = np.einsum("bgc,bpc->bgp", q, k)
  soft = _softmax(logits, 1)
  hard = (soft == soft.max(1, keepdims=True)).astype(np.float64)  # one-hot of the argmax over groups
  counts = np.maximum(hard.sum(-1, keepdims=True), 1.0)
  regions = np.einsum("bgp,bpc->bgc", hard, v) / counts  # the mean value of each region's patches
  y = _mlp(_ln(q + regions, p["proj_o_ln"]), p["proj_o_mlp"], gelu)
  return quick_gelu(y), hard, soft


def _randomised(params, seed=1):
  """Parameters moved away from their init (LayerNorm scales 1, biases 0) so every term counts."""
  leaves, treedef = jax.tree.flatten(nn.unbox(params))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_semantic_group_matches_its_definition():
  heads, layers, groups = 4, 2, 5
  module = SemanticGroup(groups, heads, cross_layers=layers)
  x = jax.random.normal(jax.random.key(0), (2, 36, 32))
  params = _randomised(module.init(jax.random.key(1), x, False)["params"])
  regions, maps = module.apply({"params": params}, x, False)
  want, hard, soft = semantic_group_by_definition(params, np.asarray(x, np.float64), heads, layers)
  np.testing.assert_array_equal(np.asarray(maps["hard"]), hard)
  np.testing.assert_allclose(maps["soft"], soft, atol=1e-5)
  np.testing.assert_allclose(regions, want, atol=1e-4)
  assert len(np.unique(hard.argmax(1))) > 1  # several regions in use: the test sees the mean per region


def test_assignment_is_one_hot_forward_and_soft_backward():
  module = SemanticGroup(4, 2, cross_layers=1)
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  params = _randomised(module.init(jax.random.key(1), x, False)["params"])
  probe = jax.random.normal(jax.random.key(3), (1, 4, 9))

  def hard_then_soft(xx):
    maps = module.apply({"params": params}, xx, False)[1]
    return jnp.sum(maps["hard"] * probe), jnp.sum(maps["soft"] * probe)

  g_hard = jax.grad(lambda xx: hard_then_soft(xx)[0])(x)
  g_soft = jax.grad(lambda xx: hard_then_soft(xx)[1])(x)
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-5, atol=1e-7)  # straight-through: soft's gradient


def test_training_samples_the_assignment_by_gumbel_max():
  """In training the hard map is argmax(logits + Gumbel noise) (tau does not move an argmax): a sample of
  the categorical softmax(logits), so its mean over many draws is the noise-free soft map."""
  module = SemanticGroup(4, 2, cross_layers=1, tau=0.9)
  x = jax.random.normal(jax.random.key(0), (1, 16, 16))
  params = nn.unbox(module.init(jax.random.key(1), x, False)["params"])
  soft = np.asarray(module.apply({"params": params}, x, False)[1]["soft"])
  draw = jax.jit(jax.vmap(lambda k: module.apply({"params": params}, x, True, rngs={"gumbel": k})[1]["hard"]))
  hard = np.asarray(draw(jax.random.split(jax.random.key(7), 2000)))
  assert set(np.unique(hard)) == {0.0, 1.0} and np.all(hard.sum(axis=2) == 1)  # one group per patch
  np.testing.assert_allclose(hard.mean(axis=0), soft, atol=0.05)  # 2000 draws: std of a mean <= 0.011
  assert np.any(hard[0] != hard[1])


def test_image_embedding_is_the_projected_max_over_regions():
  model = SegCLIP(vision=dict(image_size=32, patch_size=8, width=32, layers=3, heads=2),
                  text=dict(context_length=8, vocab_size=100, width=16, layers=1, heads=2),
                  group=dict(num_groups=4, cross_layers=1, insert_after=2), embed_dim=12)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  text = jnp.array([[1, 5, 99, 0, 0, 0, 0, 0], [1, 99, 0, 0, 0, 0, 0, 0]])
  variables = nn.unbox(model.init(jax.random.key(1), images, text))
  out = model.apply(variables, images, return_groups=True, method=SegCLIP.encode_image)
  assert out["tokens"].shape == (2, 4, 32) and out["group_embeds"].shape == (2, 4, 12)
  assert [m["hard"].shape for m in out["assignments"]] == [(2, 4, 16)]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["visual"])
  pooled = np.asarray(out["tokens"], np.float64).max(axis=1)
  np.testing.assert_allclose(out["image_embeds"], _ln(pooled, p["ln_post"]) @ p["proj"], atol=1e-5)
  full = model.apply(variables, images, text, train=True, rngs={"gumbel": jax.random.key(2)})
  assert full["image_embeds"].shape == (2, 12) and full["text_embeds"].shape == (2, 12)


def test_a_tiny_segclip_trains_and_segments_on_the_shapes_world(shapes_data_dir, tmp_path):
  """The trainer and the evaluator serve SegCLIP as they serve GroupViT: the loss falls over 60 steps (with
  the superpixel loss on its map), the grouping diagnostics are logged, the segmentation evaluator runs."""
  import json  # pylint: disable=g-import-not-at-top
  from groupvit_jax import config_lib, train  # pylint: disable=g-import-not-at-top
  from groupvit_jax.datasets import shapes  # pylint: disable=g-import-not-at-top
  voc = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=4, seed=1, image_size=32, world="coded")
  config = config_lib.load_config(f"configs/demo.py:model=segclip,world=codedtiny32,superpixels=1,dim=32,"
                                  f"steps=60,batch=16,data_dir={shapes_data_dir}")
  config.log_every = 1
  config.input.num_examples = 2000
  config.evals = {"shapes_voc": {"kind": "segmentation", "dataset": "voc", "data_dir": voc, "crop": 32,
                                 "stride": 32, "short_side": 32, "long_side": 128, "mode": "whole"}}
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = {}
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(row)
  first = np.mean([rows[s]["loss"] for s in range(1, 6)])
  last = np.mean([rows[s]["loss"] for s in range(56, 61)])
  assert last < first - 0.4, (first, last)  # 6.70 -> 5.95 measured
  assert rows[60]["superpixel_loss"] > 0 and 1 <= rows[60]["grouping/stage1_groups"] <= 8
  evaluated = json.load(open(tmp_path / "run" / "eval" / "voc_step60" / "metrics.json"))
  assert 0 <= evaluated["mIoU"] <= 100 and evaluated["images"] == 4


def test_clip_weights_make_a_segclip_checkpoint(shapes_data_dir, tmp_path):
  """A transformers CLIPModel (random weights, the demo's SegCLIP sizes) through the conversion CLI into a
  SegCLIP checkpoint (what `init_from` starts from): CLIP's parameters are CLIP's, the group module is
  initialised, and the evaluation binary segments with it under SegCLIP's protocol."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from groupvit_jax import checkpoint, config_lib  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import convert, variables_template  # pylint: disable=g-import-not-at-top
  hf_config = transformers.CLIPConfig(
      vision_config=dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                         intermediate_size=128),
      text_config=dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=16, eos_token_id=49407),
      projection_dim=64)
  torch.manual_seed(0)
  sd = {k: v.numpy() for k, v in transformers.CLIPModel(hf_config).state_dict().items()}
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "clip.safetensors"))
  spec = f"configs/demo.py:model=segclip,dim=32,world=codedtiny32,steps=4,batch=8,data_dir={shapes_data_dir}"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  res = subprocess.run([sys.executable, "-m", "groupvit_jax.models.convert", f"--config={spec}",
                        f"--input={tmp_path / 'clip.safetensors'}", f"--output={tmp_path / 'init'}"],
                       cwd=repo, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "CLIP parameters" in res.stdout and "semantic group module" in res.stdout
  config = config_lib.load_config(spec)
  variables = checkpoint.load_variables(str(tmp_path / "init"), nn.unbox(variables_template(config.model)))
  want = convert.clip_hf_to_variables(sd, {"params": {k: v for k, v in variables["params"].items() if k != "semantic"}})
  got = flax.traverse_util.flatten_dict(variables["params"])
  for path, value in flax.traverse_util.flatten_dict(want["params"]).items():
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg="/".join(path))
  assert "semantic_center" in variables["params"]["semantic"]
  # ... and back: the CLI writes CLIP's part in CLIPModel names, exactly the weights it read.
  res = subprocess.run([sys.executable, "-m", "groupvit_jax.models.convert", f"--config={spec}",
                        f"--checkpoint={tmp_path / 'init'}", f"--export_hf={tmp_path / 'back.safetensors'}"],
                       cwd=repo, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  back = load_file(str(tmp_path / "back.safetensors"))
  expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
  assert sorted(back) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k].reshape(v.shape), v, err_msg=k)
  # The evaluation binary on it, with SegCLIP's protocol (224-px short side and windows).
  from groupvit_jax.datasets import shapes  # pylint: disable=g-import-not-at-top
  voc = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=2, seed=1, image_size=32, world="coded")
  res = subprocess.run([sys.executable, "-m", "groupvit_jax.evaluate", f"--config={spec}",
                        f"--checkpoint={tmp_path / 'init'}", "--protocol=segclip", f"--data_dir={voc}",
                        f"--output_dir={tmp_path / 'eval'}"], cwd=repo, capture_output=True, text=True, timeout=900,
                       check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "voc: mIoU" in res.stdout and (tmp_path / "eval" / "metrics.json").exists()
