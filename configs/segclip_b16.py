"""SegCLIP on CLIP ViT-B/16, the paper's recipe (Luo et al., ICML 2023): CC3M + COCO captions, batch 768,
10 epochs from OpenAI's CLIP weights.

  python -m groupvit_jax.models.convert --config=configs/segclip_b16.py \
      --input=clip-vit-base-patch16.safetensors --output=/tmp/segclip_init     # transformers CLIPModel weights
  python -m groupvit_jax.train --config=configs/segclip_b16.py --workdir=gs://BUCKET/segclip_b16 \
      --config.init_from=/tmp/segclip_init \
      --config.input.data_json='[{"kind": "tfrecord", "patterns": ["gs://BUCKET/cc3m/*.tfrecord"]},
                                 {"kind": "tfrecord", "patterns": ["gs://BUCKET/coco_captions/*.tfrecord"]}]'
  python -m groupvit_jax.evaluate --config=configs/segclip_b16.py --checkpoint=gs://BUCKET/segclip_b16 \
      --protocol=segclip --dataset=voc --data_dir=VOCdevkit/VOC2012 --output_dir=/tmp/eval_voc

The recipe: AdamW (0.9, 0.98, eps 1e-6), weight decay 0.05, 15 % linear warmup then cosine to 0,
gradient clipping at 1.0; learning rate 4e-3 for the semantic group module and 4e-6 (a factor 1e-3) for
CLIP's weights; the contrastive loss, the superpixel consistency loss (Felzenszwalb at SegCLIP's
224/0.9/224 in tf.data) and the masked reconstruction (a quarter of the patches through blocks 0-9 and
the group module, each kept patch rebuilt from the regions, copies of blocks 10-11, a 3-block decoder
of width 384 predicting the dropped patches' pixels), all weight 1.
"""

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = config_lib.training_defaults()
  config.model = config_lib.segclip_model("B/16")
  config.model.dtype = "bfloat16"
  config.model.reconstruction.update(dim=384, depth=3, num_heads=8, mask_ratio=0.75)
  config.input.update(
      pp="random_resized_crop(224)|flip|superpixels(16)|normalize", batch_size=768,
      num_examples=3_400_000)  # CC3M (~2.8 M pairs reachable) + COCO captions (~0.6 M): one epoch
  config.total_epochs = 10
  config.warmup_epochs = None
  config.warmup_examples = 15 * config.input.num_examples // 10  # 15 % of the 10 epochs
  config.optim.update(lr=4e-3, reference_batch=768, warmup_lr=0.0, min_lr=0.0, b1=0.9, b2=0.98, eps=1e-6,
                      weight_decay=0.05, clip_norm=1.0,
                      lr_scales={"^(visual|text_tower|text_projection|logit_scale)(/|$)": 1e-3})
  config.loss.update(multi_label_weight=0.0, superpixel_weight=1.0, reconstruction_weight=1.0)
  return config
