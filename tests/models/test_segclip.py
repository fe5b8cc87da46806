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


def test_a_tiny_segclip_trains_with_both_losses_and_resumes_exactly(shapes_data_dir, tmp_path):
  """The trainer serves SegCLIP as it serves GroupViT: with the masked reconstruction (a quarter of the
  patches kept) and the superpixel loss the loss falls over 48 steps and the grouping diagnostics are
  logged; a run killed (-9) after step 6 and restarted logs every step exactly as the uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import subprocess_util  # pylint: disable=g-import-not-at-top
  from tests.test_train import REPO, _all_rows, _env, _metrics, _run_until  # pylint: disable=g-import-not-at-top

  def cmd(workdir):
    return [sys.executable, "-m", "groupvit_jax.train", f"--workdir={workdir}",
            f"--config=configs/demo.py:model=segclip,world=codedtiny32,superpixels=1,mask=0.75,dim=32,steps=48,"
            f"batch=16,data_dir={shapes_data_dir}", "--config.log_every=1", "--config.checkpoint_every=4",
            "--config.input.num_examples=2000", "--config.evals={}"]

  straight = str(tmp_path / "straight")
  res = subprocess_util.run(cmd(straight), cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = _metrics(straight)
  first = np.mean([rows[s]["loss"] for s in range(1, 6)])
  last = np.mean([rows[s]["loss"] for s in range(44, 49)])
  assert last < first - 0.4, (first, last)
  assert rows[48]["reconstruction_loss"] < rows[1]["reconstruction_loss"]
  assert rows[48]["superpixel_loss"] > 0 and 1 <= rows[48]["grouping/stage1_groups"] <= 8

  killed = str(tmp_path / "killed")
  rc, _ = _run_until(cmd(killed), killed, 6, signal.SIGKILL)
  assert rc == -signal.SIGKILL and max(r["step"] for r in _all_rows(killed)) < 48
  res = subprocess_util.run(cmd(killed), cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  assert [row["step"] for row in _all_rows(killed)] == list(range(1, 49))
  resumed = _metrics(killed)
  for step in range(1, 49):
    for key, value in rows[step].items():
      np.testing.assert_allclose(resumed[step][key], value, rtol=1e-6, atol=1e-7, err_msg=f"step {step} {key}")


def _demo_sized_clip(torch, transformers):
  """A transformers CLIPModel's state dict (random weights, seed 0) at the demo's SegCLIP sizes."""
  hf_config = transformers.CLIPConfig(
      vision_config=dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                         intermediate_size=128),
      text_config=dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=16, eos_token_id=49407),
      projection_dim=64)
  torch.manual_seed(0)
  return {k: v.numpy() for k, v in transformers.CLIPModel(hf_config).state_dict().items()}


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
  sd = _demo_sized_clip(torch, transformers)
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
  want = convert.clip_hf_to_variables(sd, {"params": {k: v for k, v in variables["params"].items()
                                                      if k in convert.CLIP_PARAMS}})
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


def mae_sincos(dim, grid):
  """MAE's get_2d_sincos_pos_embed (models_mae / util/pos_embed.py), with the class row of zeros."""
  grid_h = np.arange(grid, dtype=np.float64)
  grid_w = np.arange(grid, dtype=np.float64)
  g = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)  # w goes first

  def one(d, pos):
    omega = 1.0 / 10000**(np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_the_decoder_positions_are_mae_sine_cosine():
  from groupvit_jax.models.reconstruction import sincos_positions  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(sincos_positions(64, 8), mae_sincos(64, 8)[1:], atol=1e-6)
  np.testing.assert_allclose(sincos_positions(384, 14), mae_sincos(384, 14)[1:], atol=1e-6)


def _torch_semantic(sd, x, heads, layers, groups):
  """SegCLIP's SemanticLearnerModule at evaluation on the release's tensors, with torch's functional ops
  (MultiheadAttention's forward, grouped Conv1d, LayerNorm), each image's centers attending to its own
  tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  f = torch.nn.functional
  t = lambda k: torch.as_tensor(sd["clip.visual.transformer.semantic_layer2." + k], dtype=torch.float64)
  x = torch.as_tensor(np.array(x), dtype=torch.float64)
  b, _, c = x.shape
  ln = lambda y, n: f.layer_norm(y, (c,), t(n + ".weight"), t(n + ".bias"))
  qgelu = lambda y: y * torch.sigmoid(1.702 * y)
  q = t("semantic_center")[None].repeat(b, 1, 1)
  for i in range(layers):
    pre = f"cross_att.{i}."
    kv = ln(torch.cat([q, x], 1), pre + "ln_k").transpose(0, 1)
    att, _ = f.multi_head_attention_forward(
        ln(q, pre + "ln_x").transpose(0, 1), kv, kv, c, heads, t(pre + "attn.in_proj_weight"),
        t(pre + "attn.in_proj_bias"), None, None, False, 0.0, t(pre + "attn.out_proj.weight"),
        t(pre + "attn.out_proj.bias"), training=False, need_weights=False)
    q = q + att.transpose(0, 1)
    h = qgelu(f.linear(ln(q, pre + "ln_2"), t(pre + "mlp.c_fc.weight"), t(pre + "mlp.c_fc.bias")))
    q = q + f.linear(h, t(pre + "mlp.c_proj.weight"), t(pre + "mlp.c_proj.bias"))
  q = ln(q, "cross_ln")
  normed = ln(x, "norm").transpose(1, 2)
  k = ln(f.conv1d(normed, t("k_conv.weight"), groups=heads).transpose(1, 2), "k_ln")
  v = f.conv1d(normed, t("v_conv.weight"), groups=heads).transpose(1, 2)
  soft = torch.einsum("bgc,blc->bgl", q, k).softmax(1)
  hard = f.one_hot(soft.argmax(1), groups).transpose(1, 2).to(torch.float64)
  regions = hard @ v / hard.sum(-1, keepdim=True).clamp_min(1.0)
  y = ln(q + regions, "proj_o.ln")
  y = f.linear(f.gelu(f.linear(y, t("proj_o.mlp.fc1.weight"), t("proj_o.mlp.fc1.bias"))),
               t("proj_o.mlp.fc2.weight"), t("proj_o.mlp.fc2.bias"))
  return qgelu(y).numpy(), hard.numpy()


def _release_state_dict(hf_sd, width, heads, groups, insert_after, decoder, rng):
  """A state dict in the naming of SegCLIP's release (random values in torch's layouts): CLIP in OpenAI's
  names under `clip.`, the visual blocks split into layers0 / layers2 around the group module."""
  from tests.models.test_clip import openai_names  # pylint: disable=g-import-not-at-top
  sd = {}
  for key, value in openai_names(hf_sd).items():
    if key in ("input_resolution", "context_length", "vocab_size"):
      continue
    parts = key.split(".")
    if key.startswith("visual.transformer.resblocks."):
      i = int(parts[3])
      parts[2:4] = ["layers0", str(i)] if i < insert_after else ["layers2", str(i - insert_after)]
    sd["clip." + ".".join(parts)] = value
  r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
  c = width
  sem = {"semantic_center": r(groups, c), "cross_ln.weight": 1 + r(c), "cross_ln.bias": r(c),
         "norm.weight": 1 + r(c), "norm.bias": r(c), "k_ln.weight": 1 + r(c), "k_ln.bias": r(c),
         "k_conv.weight": r(c, c // heads, 1), "v_conv.weight": r(c, c // heads, 1),
         "proj_o.ln.weight": 1 + r(c), "proj_o.ln.bias": r(c), "proj_o.mlp.fc1.weight": r(4 * c, c),
         "proj_o.mlp.fc1.bias": r(4 * c), "proj_o.mlp.fc2.weight": r(c, 4 * c), "proj_o.mlp.fc2.bias": r(c)}
  for i in range(2):
    sem.update({f"cross_att.{i}.attn.in_proj_weight": r(3 * c, c), f"cross_att.{i}.attn.in_proj_bias": r(3 * c),
                f"cross_att.{i}.attn.out_proj.weight": r(c, c), f"cross_att.{i}.attn.out_proj.bias": r(c),
                f"cross_att.{i}.mlp.c_fc.weight": r(4 * c, c), f"cross_att.{i}.mlp.c_fc.bias": r(4 * c),
                f"cross_att.{i}.mlp.c_proj.weight": r(c, 4 * c), f"cross_att.{i}.mlp.c_proj.bias": r(c)})
    for n in ("ln_x", "ln_k", "ln_2"):
      sem.update({f"cross_att.{i}.{n}.weight": 1 + r(c), f"cross_att.{i}.{n}.bias": r(c)})
  sd.update({"clip.visual.transformer.semantic_layer2." + k: v for k, v in sem.items()})
  sd["clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.weight"] = r(groups, groups)
  sd["clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.bias"] = r(groups)
  mae = {"attn.in_proj_weight": r(3 * c, c), "attn.in_proj_bias": r(3 * c), "attn.out_proj.weight": r(c, c),
         "attn.out_proj.bias": r(c), "ln_1.weight": r(c), "ln_1.bias": r(c), "ln_2.weight": r(c), "ln_2.bias": r(c),
         "mlp.c_fc.weight": r(4 * c, c), "mlp.c_fc.bias": r(4 * c), "mlp.c_proj.weight": r(c, 4 * c),
         "mlp.c_proj.bias": r(c)}
  sd.update({"clip.visual.transformer.layers_mae2.0." + k: v for k, v in mae.items()})
  d, pixels, num_patches = decoder
  dec = {"decoder_embed.weight": r(d, c), "decoder_embed.bias": r(d), "mask_token": r(1, 1, d),
         "decoder_pos_embed": mae_sincos(d, int(num_patches**0.5))[None].astype(np.float32),
         "decoder_blocks.0.norm1.weight": r(d), "decoder_blocks.0.norm1.bias": r(d),
         "decoder_blocks.0.attn.qkv.weight": r(3 * d, d), "decoder_blocks.0.attn.qkv.bias": r(3 * d),
         "decoder_blocks.0.attn.proj.weight": r(d, d), "decoder_blocks.0.attn.proj.bias": r(d),
         "decoder_blocks.0.norm2.weight": r(d), "decoder_blocks.0.norm2.bias": r(d),
         "decoder_blocks.0.mlp.fc1.weight": r(4 * d, d), "decoder_blocks.0.mlp.fc1.bias": r(4 * d),
         "decoder_blocks.0.mlp.fc2.weight": r(d, 4 * d), "decoder_blocks.0.mlp.fc2.bias": r(d),
         "decoder_norm.weight": r(d), "decoder_norm.bias": r(d), "decoder_pred.weight": r(pixels, d),
         "decoder_pred.bias": r(pixels)}
  sd.update({"vis_mae_decoder." + k: v for k, v in dec.items()})
  sd["seq_mae_decoder.decoder_embed.weight"] = r(4, 4)  # the text reconstruction's, not built here
  return sd


def test_segclips_released_weights_import(tmp_path):
  """A state dict named as SegCLIP's release (`segclip.bin`), saved by torch, through the conversion:
  CLIP's towers equal the transformers route, the group module computes what torch's functional ops
  compute on the release's tensors, and the reconstruction's tensors land where they act."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from groupvit_jax import checkpoint, config_lib  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import convert, variables_template  # pylint: disable=g-import-not-at-top
  hf_sd = _demo_sized_clip(torch, transformers)
  sd = _release_state_dict(hf_sd, 32, 4, 8, 4, (64, 48, 64), np.random.default_rng(0))
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, str(tmp_path / "segclip.bin"))
  config = config_lib.load_config("configs/demo.py:model=segclip,dim=32,mask=0.75,data_dir=/nonexistent")
  assert convert.clip_state_dict_format(sd) == "segclip"
  convert._import_clip_for_segclip(config, str(tmp_path / "segclip.bin"), str(tmp_path / "init"))  # pylint: disable=protected-access
  params = checkpoint.load_variables(str(tmp_path / "init"), nn.unbox(variables_template(config.model)))["params"]
  # CLIP's towers: as the transformers route reads them.
  clip_template = {"params": {k: v for k, v in params.items() if k in convert.CLIP_PARAMS}}
  want = flax.traverse_util.flatten_dict(convert.clip_hf_to_variables(hf_sd, clip_template)["params"])
  got = flax.traverse_util.flatten_dict(params)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg="/".join(path))
  # The group module: its forward against torch's on the same tensors.
  x = jax.random.normal(jax.random.key(3), (2, 64, 32))
  regions, maps = SemanticGroup(8, 4).apply({"params": params["semantic"]}, x, False)
  want_regions, want_hard = _torch_semantic(sd, x, 4, 2, 8)
  np.testing.assert_array_equal(np.asarray(maps["hard"]), want_hard)
  np.testing.assert_allclose(regions, want_regions, atol=1e-4)
  # The reconstruction: Linear weights transposed, the mask token flattened, torch's qkv rows as columns.
  p = "clip.visual.transformer."
  np.testing.assert_array_equal(params["reconstruct_layer"]["kernel"], sd[p + "reconstruct_layer2.rec_proj_a.a_fc.weight"].T)
  np.testing.assert_array_equal(params["mae_blocks_0"]["attn"]["in_proj"]["kernel"],
                                sd[p + "layers_mae2.0.attn.in_proj_weight"].T)
  np.testing.assert_array_equal(params["mae_blocks_0"]["mlp"]["fc1"]["kernel"], sd[p + "layers_mae2.0.mlp.c_fc.weight"].T)
  dec = params["mae_decoder"]
  np.testing.assert_array_equal(dec["mask_token"], sd["vis_mae_decoder.mask_token"].reshape(-1))
  np.testing.assert_array_equal(dec["blocks_0"]["attn"]["qkv"]["kernel"], sd["vis_mae_decoder.decoder_blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(dec["pred"]["bias"], sd["vis_mae_decoder.decoder_pred.bias"])
  # Without the reconstruction in the config its tensors are left out (and said so); a foreign name is refused.
  plain = config_lib.load_config("configs/demo.py:model=segclip,dim=32,recon=0,data_dir=/nonexistent")
  template = {"params": nn.unbox(variables_template(plain.model))["params"]}
  _, notes = convert.segclip_release_to_variables(sd, template, 4)
  assert len(notes) == 1 and "not built by this config" in notes[0]
  with pytest.raises(ValueError, match="clip.visual.transformer.bogus"):
    convert.segclip_release_to_variables({**sd, "clip.visual.transformer.bogus": np.zeros(2)}, template, 4)
