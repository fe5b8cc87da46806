"""LSeg as released: ViT-L/16 at 384 px with a DPT decoder, CLIP ViT-B/32's text tower (frozen), and its
ADE20K recipe (crop 480, SGD lr 0.004 x batch / 16 with the decoder at 10x, poly decay, 240 epochs).

  python -m groupvit_jax.models.convert --config=configs/lseg_vitl16.py --input=lseg.ckpt --output=/tmp/lseg_vitl16
  python -m groupvit_jax.evaluate --config=configs/lseg_vitl16.py --checkpoint=/tmp/lseg_vitl16 \\
      --dataset=ade20k --data_dir=ADEChallengeData2016
  python -m groupvit_jax.train --config=configs/lseg_vitl16.py:data=gs://B/ade20k/train-*.tfrecord --workdir=...

Training data: TFRecord shards of `image` (JPEG/PNG) + `mask` (single-channel PNG of ADE20K's ids, 0 =
unlabelled); ids 1..150 become labels 0..149 and 0 is ignored, as the reference's ADE20K loader does.
"""

import ml_collections

from groupvit_jax import config_lib
from groupvit_jax.evaluators import seg_datasets


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, data="", batch=16, epochs=240, crop=480, lr=0.004)
  config = config_lib.training_defaults()
  config.model = config_lib.lseg_model()
  config.labels = list(seg_datasets.ADE20K_CLASSES)
  config.input.update(
      data=[dict(kind="tfrecord", patterns=[arg.data], image_key="image", mask_key="mask")] if arg.data else [],
      pp=(f"decode|decode_mask|map_labels({tuple(range(1, 151))})|random_scale_crop({arg.crop}, scale=(0.5, 2.0), "
          "base_size=520)|flip|normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"),
      batch_size=arg.batch, num_examples=20_210)
  config.total_epochs = arg.epochs
  config.warmup_epochs = 0
  config.optim.update(name="sgd", schedule="poly", lr=arg.lr, reference_batch=16, momentum=0.9, weight_decay=1e-4,
                      clip_norm=0.0, freeze="^text_", lr_scales={"^(?!backbone/)": 10.0})
  config.checkpoint_every = 2000
  return config
