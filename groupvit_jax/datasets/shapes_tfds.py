"""The shapes world as a TFDS builder: prepared locally from a seed, no download.

  builder = ShapesWorld(config="size64", data_dir="/tmp/tfds")
  builder.download_and_prepare()
  ds = builder.as_dataset(split="train")

Splits are generated from different seeds, so `validation` (seed 1) and `test` (seed 2) are images
training (seed 0) never saw.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from groupvit_jax.datasets import shapes

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Image size, world (`shapes.WORLDS`) and split sizes of a shapes-world variant."""
  image_size: int = 64
  world: str = "standard"
  num_train: int = 20_000
  num_validation: int = 500
  num_test: int = 500


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """Captioned shapes with exact segmentation masks (groupvit_jax.datasets.shapes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesWorldConfig(name="size64", image_size=64),
      ShapesWorldConfig(name="size224", image_size=224, num_train=5_000),
      ShapesWorldConfig(name="tiny32", image_size=32, num_train=2_000, num_validation=200, num_test=200),
      ShapesWorldConfig(name="size32", image_size=32, num_train=50_000, num_validation=500, num_test=500),
      ShapesWorldConfig(name="coded64", image_size=64, world="coded"),
      ShapesWorldConfig(name="coded32", image_size=32, world="coded", num_train=50_000),
      ShapesWorldConfig(name="codedtiny32", image_size=32, world="coded", num_train=2_000, num_validation=200,
                        num_test=200),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
            "caption": tfds.features.Text(),
            "nouns": tfds.features.Sequence(tfds.features.Text()),
            "index": np.int64,
        }),
        supervised_keys=None,
        homepage="https://github.com/groupvit-jax",
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(SPLIT_SEEDS[split], n) for split, n in sizes.items()}

  def _generate_examples(self, seed: int, num: int):
    for i in range(num):
      ex = shapes.render(seed, i, self.builder_config.image_size, **shapes.WORLDS[self.builder_config.world])
      yield i, {"image": ex["image"], "mask": ex["mask"][..., None], "caption": ex["caption"],
                "nouns": ex["nouns"], "index": i}
