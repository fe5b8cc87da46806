"""The evaluation binary: zero-shot segmentation mIoU with pictures, and zero-shot classification.

  python -m groupvit_jax.evaluate --config=configs/groupvit_s.py --checkpoint=/tmp/groupvit_s \
      --dataset=voc --data_dir=VOCdevkit/VOC2012 --output_dir=/tmp/eval_voc
  python -m groupvit_jax.evaluate --config=configs/groupvit_s.py --checkpoint=/tmp/groupvit_s \
      --dataset=classification --data_dir=imagenet/val --output_dir=/tmp/eval_in1k [--templates=subset]

Segmentation layouts: voc, context, coco_object, ade20k, generic (evaluators/seg_datasets.py);
`classification` reads class folders (evaluators/classification.py) and writes metrics.json (top-1/5).
Any config field can be overridden as in training (`--config.model.dtype=bfloat16`).

`--checkpoint` is a variables checkpoint (models/convert.py) or a training workdir (its latest
checkpoint). Writes `metrics.json`, `per_class.csv` and `pictures/*.png` (input | prediction with legend |
ground truth | group maps per stage) into `--output_dir`, atomically: everything is written to a
temporary directory that replaces the output directory only when complete.
"""

from groupvit_jax import cli  # first: TensorFlow imported with its native start-up lines silenced

from absl import flags
from ml_collections import config_flags

from groupvit_jax import checkpoint
from groupvit_jax.evaluators import classification, seg_datasets, segmentation
from groupvit_jax.models import build_model
from groupvit_jax.pp import tokenizers


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if f.tokenizer:
    config.input.tokenizer = f.tokenizer
  if f.dataset == "classification":
    folder = classification.load_folder(f.data_dir)
    model = build_model(config.model)
    variables = checkpoint.load_model_variables(f.checkpoint, config.model)
    result = classification.zero_shot_classify(
        model, variables, folder, tokenizers.get_tokenizer(config.input.tokenizer),
        image_size=config.model.image.image_size, context_length=config.input.context_length,
        templates=f.templates or "subset", limit=f.limit)
    classification.write_json_atomically(result, f.output_dir)
    print(f"zero-shot classification: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"({result['images']} images, {result['classes']} classes, {result['images_per_sec']:.1f} images/s)")
    return
  dataset = seg_datasets.load(f.dataset, f.data_dir)
  model = build_model(config.model)
  variables = checkpoint.load_model_variables(f.checkpoint, config.model)
  protocol = segmentation.PROTOCOLS[f.protocol]
  given = lambda name: f[name].value if f[name].present else protocol[name]
  bg = f.bg_threshold if f.bg_threshold is not None else protocol["bg_thresholds"].get(f.dataset, 0.95)
  segmenter = segmentation.ZeroShotSegmenter(
      model, variables, dataset.text_classes, tokenizers.get_tokenizer(config.input.tokenizer),
      patch_size=config.model.image.patch_size, context_length=config.input.context_length,
      templates=f.templates or "simple", bg_threshold=bg if dataset.has_background else None, mode=f.mode,
      crop=given("crop"), stride=given("stride"), short_side=given("short_side"),
      scales=[float(s) for s in f.scales],
      **{k: protocol[k] for k in ("mean", "std") if k in protocol})
  n = min(f.limit, len(dataset.items)) if f.limit else len(dataset.items)
  print(f"evaluating {n} images of {f.data_dir}", flush=True)
  result = segmentation.evaluate_segmentation(segmenter, dataset, f.output_dir, f.num_pictures, f.limit)
  print(segmentation.format_table(result))


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]) whose model the checkpoint holds.",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory or training workdir.")
  flags.DEFINE_enum("dataset", "voc", sorted(seg_datasets.LAYOUTS) + ["classification"],
                    "Segmentation layout, or `classification` (ImageNet-style class folders).")
  flags.DEFINE_string("data_dir", None, "Root of the dataset layout.")
  flags.DEFINE_string("output_dir", None, "Where metrics.json, per_class.csv and pictures/ go.")
  flags.DEFINE_string("tokenizer", None, "Override config.input.tokenizer.")
  flags.DEFINE_enum("protocol", "groupvit", sorted(segmentation.PROTOCOLS),
                    "Published protocol whose windows and background thresholds are the defaults: groupvit "
                    "(448-px short side, 448/224 windows), segclip (224, 224/224, VOC 0.80, Context 0.25, "
                    "COCO 0.65) or lseg (520, 480/320, images normalised with mean and std 0.5).")
  flags.DEFINE_float("bg_threshold", None, "Background threshold (default: the protocol's for the dataset).")
  flags.DEFINE_enum("mode", "slide", ["slide", "whole"], "Sliding 448/224 windows or the whole image.")
  flags.DEFINE_string("templates", None, "Prompt template set for class names (default: simple for "
                      "segmentation, as the reference; subset for classification).")
  flags.DEFINE_integer("short_side", 448, "Test-time short side (default: the protocol's).")
  flags.DEFINE_integer("crop", 448, "Sliding-window size (default: the protocol's).")
  flags.DEFINE_integer("stride", 224, "Sliding-window stride (default: the protocol's).")
  flags.DEFINE_list("scales", ["1.0"], "Test-time scale ratios (several: multi-scale, scores averaged).")
  flags.DEFINE_integer("num_pictures", 8, "Pictures for the first N images.")
  flags.DEFINE_integer("limit", None, "Evaluate only the first N images.")
  flags.mark_flags_as_required(["config", "checkpoint", "data_dir", "output_dir"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
