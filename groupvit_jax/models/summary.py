"""Prints a model's parameter counts per tower and runs one forward pass on random inputs.

  python -m groupvit_jax.models.summary --config=configs/groupvit_s.py
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp

from groupvit_jax import config_lib
from groupvit_jax.models import build_model, count_params, random_variables

flags.DEFINE_string("config", "configs/groupvit_s.py", "Config file (path[:arg]).")
flags.DEFINE_integer("batch", 2, "Batch for the forward pass.")

OFFICIAL_GROUPVIT_S = 55_726_610


def main(argv):
  del argv
  config = config_lib.load_config(flags.FLAGS.config)
  m = config.model
  model = build_model(m)
  start = time.perf_counter()
  variables = random_variables(model, m, jax.random.key(0))
  params = variables["params"]
  print(f"{'part':<26}{'parameters':>14}")
  for name in sorted(params):
    print(f"{name:<26}{count_params(params[name]):>14,}")
  total = count_params(params)
  print(f"{'total':<26}{total:>14,}   (official GroupViT-S: {OFFICIAL_GROUPVIT_S:,})")
  images = jax.random.normal(jax.random.key(1), (flags.FLAGS.batch, m.image.image_size, m.image.image_size, 3))
  text = jnp.tile(jnp.arange(m.text.context_length, dtype=jnp.int32)[None], (flags.FLAGS.batch, 1))
  out = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))(variables, images)
  text_embeds = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, text)
  shapes = [tuple(a["hard"].shape) for a in out["assignments"]]
  print(f"image embeds {tuple(out['image_embeds'].shape)}, text embeds {tuple(text_embeds.shape)}, "
        f"assignment maps {shapes} (groups x tokens); init + forward {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main)
