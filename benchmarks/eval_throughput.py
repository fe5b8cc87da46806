"""Zero-shot segmentation throughput: 448-px sliding-window inference (the reference protocol).

  python -m benchmarks.eval_throughput [--config=configs/groupvit_s.py] [--images=6] [--height=375 --width=500]

Random weights (throughput does not depend on them), VOC-sized images (500x375 -> 448x597 after the
test-time resize -> 2 windows of 448), 20 classes + background. Prints images/s and windows/s after a
warm-up image (compilation excluded, reported separately).
"""

import time

from absl import app, flags
import jax
import numpy as np

from groupvit_jax import config_lib
from groupvit_jax.evaluators import seg_datasets
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter, slide_windows, test_time_resize_shape
from groupvit_jax.models import build_model, random_variables
from groupvit_jax.pp.tokenizers import ClipBpeTokenizer

flags.DEFINE_string("config", "configs/groupvit_s.py", "Model config.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("images", 6, "Images to time.")
flags.DEFINE_integer("height", 375, "Image height.")
flags.DEFINE_integer("width", 500, "Image width.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = config_lib.load_config(FLAGS.config)
  config.model.dtype = FLAGS.dtype
  model = build_model(config.model)
  m = config.model
  variables = random_variables(model, m, jax.random.key(0))
  seg = ZeroShotSegmenter(model, variables, seg_datasets.VOC_CLASSES[1:], ClipBpeTokenizer(),
                          patch_size=m.image.patch_size, context_length=config.input.context_length)
  rng = np.random.RandomState(0)
  images = [(rng.rand(FLAGS.height, FLAGS.width, 3) * 255).astype(np.uint8) for _ in range(FLAGS.images + 1)]
  h, w = test_time_resize_shape(FLAGS.height, FLAGS.width)
  windows = len(slide_windows(h, w, 448, 224))
  start = time.perf_counter()
  seg.predict(images[0])
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for image in images[1:]:
    seg.predict(image)
  seconds = time.perf_counter() - start
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, {FLAGS.config} ({FLAGS.dtype}), "
        f"{FLAGS.width}x{FLAGS.height} -> {w}x{h}, {windows} windows of 448 per image")
  print(f"first image (compile + run): {compile_s:.1f} s")
  print(f"sliding-window inference: {FLAGS.images / seconds:.3f} images/s, {FLAGS.images * windows / seconds:.3f} "
        f"windows/s ({seconds / FLAGS.images:.2f} s per image)")


if __name__ == "__main__":
  app.run(main)
