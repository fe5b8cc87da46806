"""Are the groups wrong, or their names? Zero-shot mIoU next to the mIoU of oracle-named groups.

  python -m benchmarks.grouping_quality --workdir=/tmp/groupvit_jax_demo --config=configs/demo.py
  python -m benchmarks.grouping_quality --workdir=untrained --config=configs/demo.py:world=coded64

For a trained workdir (its latest checkpoint) or `untrained` (random initialisation, seed 0) it segments
the demo's held-out split (`--data`, default: the folder `groupvit_jax.demo` writes for the config's
world and image size) as the demo's evaluator does (whole image, background threshold) and, for each
stage's group map, the mIoU the same groups would reach if each took its majority true class (oracle
names; an upper bound given the groups) and the mean number of groups per image. Zero-shot mIoU far
below the oracle means naming fails; a low oracle with few groups means the grouping collapsed.
"""

from absl import app, flags
import jax
import numpy as np

from groupvit_jax import checkpoint, config_lib, demo
from groupvit_jax.evaluators import miou, seg_datasets
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter
from groupvit_jax.models import build_model, random_variables
from groupvit_jax.pp import tokenizers

flags.DEFINE_string("config", "configs/demo.py", "Config (path[:arg]) the workdir was trained with.")
flags.DEFINE_string("workdir", "untrained", "Training workdir, or 'untrained' for the random initialisation.")
flags.DEFINE_string("data", None, "VOC-layout held-out folder (default: the demo's for this config).")
flags.DEFINE_integer("images", 200, "Images to evaluate.")
flags.DEFINE_float("bg_threshold", 0.95, "Background threshold (the demo's).")
FLAGS = flags.FLAGS


def oracle_labels(groups: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Each group's pixels take the most frequent true class under the group (ignored pixels excluded)."""
  out = np.full_like(mask, 255)
  for g in np.unique(groups):
    labels = mask[(groups == g) & (mask != 255)]
    if labels.size:
      out[groups == g] = np.bincount(labels, minlength=num_classes).argmax()
  return out


def main(argv):
  del argv
  config = config_lib.load_config(FLAGS.config)
  model = build_model(config.model)
  if FLAGS.workdir == "untrained":
    variables = random_variables(model, config.model, jax.random.key(0))
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  else:
    variables = checkpoint.load_model_variables(FLAGS.workdir, config.model)
  if FLAGS.data is None:  # the demo's own held-out split (written if missing)
    ev = demo.heldout_evals(config, demo.heldout_root(config, FLAGS.images), FLAGS.images, FLAGS.bg_threshold)["heldout"]
  else:
    ev = demo.heldout_evaluator(config, FLAGS.data, FLAGS.bg_threshold)
  root = ev["data_dir"]
  dataset = seg_datasets.load("voc", root)
  segmenter = ZeroShotSegmenter(
      model, variables, dataset.text_classes, tokenizers.get_tokenizer(config.input.tokenizer),
      patch_size=config.model.image.patch_size, context_length=config.input.context_length,
      **{k: ev[k] for k in ("bg_threshold", "mode", "short_side", "long_side", "crop", "stride")})
  n = len(dataset.classes)
  zero_shot, oracle, used = miou.ConfusionMatrix(n), [], []
  for item in dataset.items[:FLAGS.images]:
    image, mask = seg_datasets.read_pair(item, n)
    pred, group_maps = segmenter.predict(image, return_groups=True)
    zero_shot.update(pred, mask)
    for s, groups in enumerate(group_maps):
      if s == len(oracle):
        oracle.append(miou.ConfusionMatrix(n))
        used.append([])
      groups = np.asarray(groups)
      if groups.shape != mask.shape:
        raise ValueError(f"group map {groups.shape} differs from mask {mask.shape}: use a held-out split at "
                         f"the model's image size ({config.model.image.image_size})")
      oracle[s].update(oracle_labels(groups, mask, n), mask)
      used[s].append(len(np.unique(groups)))
  pct = lambda m: 100 * miou.metrics_from_confusion(m.matrix)["mIoU"]
  print(f"{FLAGS.workdir} ({min(FLAGS.images, len(dataset.items))} images of {root}):")
  print(f"  zero-shot mIoU {pct(zero_shot):.1f}")
  for s, (m, u) in enumerate(zip(oracle, used)):
    print(f"  stage {s + 1}: oracle-named groups mIoU {pct(m):.1f}, {np.mean(u):.1f} groups per image")


if __name__ == "__main__":
  app.run(main)
