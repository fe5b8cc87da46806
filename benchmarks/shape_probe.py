"""How fast can the demo's image tower learn to name shapes *with* labels? (a learnability probe)

The demo trains from captions only; if the image tower cannot tell shapes apart even when told the
answer, no caption recipe will make it segment them in the same budget. This probe trains the demo's
image tower (configs/demo.py, any of its arguments) with a linear head on the multi-hot shape labels
(sigmoid cross-entropy) and prints, every `--every` steps, held-out top-1 (is the highest-scoring class
one that is in the image; chance ~ objects/8) and per-label accuracy.

  python -m benchmarks.shape_probe --config_arg=stages=0 --steps=600
  python -m benchmarks.shape_probe --world='{"backgrounds": ["solid"], "max_objects": 1}' --silhouettes

`--world` passes `groupvit_jax.datasets.shapes.render` knobs (easier worlds); `--silhouettes` replaces
each image by its binary object mask (shape only: no colour, no background texture).
"""

import json
import time

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np
import optax

from groupvit_jax import config_lib
from groupvit_jax.datasets import shapes
from groupvit_jax.models.grouping import GroupViTImageEncoder

flags.DEFINE_string("config_arg", "", "Arguments of configs/demo.py (e.g. 'stages=0,size=32,patch=4').")
flags.DEFINE_integer("steps", 600, "Training steps.")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_float("lr", 2e-3, "Peak learning rate (AdamW, 100 warmup steps, cosine).")
flags.DEFINE_integer("train_images", 30_000, "Distinct training images (seed 0).")
flags.DEFINE_integer("eval_images", 1_000, "Held-out images (seed 1).")
flags.DEFINE_integer("every", 100, "Evaluate every N steps.")
flags.DEFINE_string("world", "{}", "JSON dict of shapes.render knobs: backgrounds, max_objects, object_size, palette.")
flags.DEFINE_bool("silhouettes", False, "Train and evaluate on binary object masks instead of the images.")
FLAGS = flags.FLAGS


def make_data(seed: int, n: int, size: int, world: dict, silhouettes: bool) -> tuple[np.ndarray, np.ndarray]:
  images = np.zeros((n, size, size, 3), np.float32)
  labels = np.zeros((n, len(shapes.CLASSES)), np.float32)
  for i in range(n):
    ex = shapes.render(seed, i, size, **world)
    if silhouettes:
      images[i] = (ex["mask"][..., None] > 0) * 2.0 - 1.0
    else:
      images[i] = (ex["image"] / 255.0 - 0.45) / 0.27
    for name in ex["nouns"]:
      labels[i, shapes.CLASSES.index(name)] = 1
  return images, labels


class Probe(nn.Module):
  image: dict

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(len(shapes.CLASSES))(GroupViTImageEncoder(**self.image)(x, train=train)["pooled"])


def main(argv):
  del argv
  config = config_lib.load_config(f"configs/demo.py:{FLAGS.config_arg}" if FLAGS.config_arg else "configs/demo.py")
  image = dict(config.model.image)
  for key in ("depths", "num_heads", "num_group_tokens", "num_output_groups"):
    image[key] = tuple(image[key])
  size, world = image["image_size"], json.loads(FLAGS.world)
  start = time.time()
  x_train, y_train = make_data(0, FLAGS.train_images, size, world, FLAGS.silhouettes)
  x_test, y_test = make_data(1, FLAGS.eval_images, size, world, FLAGS.silhouettes)
  print(f"rendered {len(x_train)} + {len(x_test)} images of {size} px in {time.time() - start:.0f} s; "
        f"world {world or 'standard'}{', silhouettes' if FLAGS.silhouettes else ''}; "
        f"chance top-1 {y_test.sum(1).mean() / len(shapes.CLASSES):.3f}", flush=True)

  model = Probe(image)
  rngs = {"params": jax.random.PRNGKey(0), "gumbel": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
  params = model.init(rngs, x_train[:2], False)["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(1e-5, FLAGS.lr, 100, FLAGS.steps, 1e-5), weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, True, rngs={"gumbel": rng, "dropout": rng})
      return optax.sigmoid_binary_cross_entropy(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(lambda p, x: model.apply({"params": p}, x, False))
  order = np.random.default_rng(0)
  start = time.time()
  for s in range(1, FLAGS.steps + 1):
    idx = order.integers(0, len(x_train), FLAGS.batch)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx], jax.random.PRNGKey(s))
    if s % FLAGS.every == 0 or s == FLAGS.steps:
      logits = np.concatenate([np.asarray(predict(params, x_test[i:i + 250])) for i in range(0, len(x_test), 250)])
      top1 = y_test[np.arange(len(y_test)), logits.argmax(1)].mean()
      per_label = ((logits > 0) == (y_test > 0)).mean()
      print(f"step {s:5d}  train loss {float(loss):.3f}  held-out top-1 {top1:.3f}  per-label acc {per_label:.3f}  "
            f"({s * FLAGS.batch / (time.time() - start):.0f} images/s)", flush=True)


if __name__ == "__main__":
  app.run(main)
