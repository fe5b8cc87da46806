"""Training sources: TFRecord shards (img2dataset schema), any TFDS dataset, the shapes world, and for
mask-supervised training the evaluators' folder layouts.

Every source yields an infinite, deterministically shuffled stream of this host's share of examples
`{"image": encoded bytes or uint8 [h, w, 3], "text": caption, optional "nouns": [n] strings}`, or with
masks `{"image", "mask": PNG bytes or uint8 [h, w(, 1)]}`;
`mixed_source` samples several by weight. Given the seed, the stream is a fixed sequence, which is what
makes the pipeline resumable by position (see input_pipeline.py).
"""

from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def expand_patterns(patterns: Sequence[str]) -> list[str]:
  """Globs (local or gs://) -> sorted file list; raises naming the pattern that matched nothing."""
  files = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise FileNotFoundError(f"no files match {pattern!r}")
    files.extend(matched)
  return files


def _host_files(files: list[str], process_index: int, process_count: int):
  """This host's files if there are enough to split by file, else all files and an element shard."""
  if len(files) >= process_count:
    return files[process_index::process_count], None
  return files, (process_count, process_index)


def tfrecord_source(patterns: Sequence[str], *, seed: int, process_index: int = 0, process_count: int = 1,
                    image_key: str = "jpg", text_key: str = "txt", mask_key: str = "", shuffle_buffer: int = 10_000,
                    cycle_length: int = 16) -> tf.data.Dataset:
  """TFRecords of tf.train.Example with image bytes under `image_key` and the caption under `text_key`.

  This is img2dataset's `--output_format tfrecord` schema (`key`, `jpg`, `txt`, ...). A `nouns` bytes
  list, written by our webdataset converter, is used when present. With `mask_key` (mask-supervised
  training) the examples are image + mask instead: a single-channel PNG of label ids (255: ignore).
  """
  files, element_shard = _host_files(expand_patterns(patterns), process_index, process_count)
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
          text_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
          "nouns": tf.io.VarLenFeature(tf.string)}
  if mask_key:
    spec = {image_key: spec[image_key], mask_key: tf.io.FixedLenFeature([], tf.string, default_value="")}

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    if mask_key:
      return {"image": ex[image_key], "mask": ex[mask_key]}
    return {"image": ex[image_key], "text": ex[text_key], "nouns": tf.sparse.to_dense(ex["nouns"])}

  ds = tf.data.Dataset.from_tensor_slices(files)
  # Files reshuffled every epoch, deterministically from the seed.
  ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)), block_length=1,
                     num_parallel_calls=AUTOTUNE, deterministic=True)
  if element_shard:
    ds = ds.shard(*element_shard)
  ds = ds.shuffle(shuffle_buffer, seed=seed + 1)
  return ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True)


def _get_path(ex: dict[str, Any], path: str):
  for part in path.split("/"):
    ex = ex[part]
  return ex


def tfds_source(name: str, split: str, *, seed: int, process_index: int = 0, process_count: int = 1,
                data_dir: str | None = None, image_key: str = "image", text_key: str = "caption",
                mask_key: str = "", shuffle_buffer: int = 10_000, prepare: bool = False) -> tf.data.Dataset:
  """Any TFDS dataset with an image and a caption feature (`text_key` may be a path: "captions/text";
  a caption list contributes its first caption), or with `mask_key` an image and a segmentation mask
  (mask-supervised training). Images stay encoded until the pp ops decode them."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from groupvit_jax.datasets import shapes_tfds  # pylint: disable=g-import-not-at-top,unused-import  (registers)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"TFDS dataset {name!r} is not known to tensorflow_datasets") from None
  if prepare:
    builder.download_and_prepare()
  elif not tf.io.gfile.exists(builder.data_dir):
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir!r}")
  host_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=4)
  decoders = {image_key.split("/")[0]: tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=host_split, shuffle_files=True, read_config=read_config, decoders=decoders)

  def convert(ex):
    if mask_key:
      return {"image": _get_path(ex, image_key), "mask": _get_path(ex, mask_key)}
    text = _get_path(ex, text_key)
    if text.shape.rank:
      text = text[0]
    out = {"image": _get_path(ex, image_key), "text": text}
    if "nouns" in ex:
      out["nouns"] = ex["nouns"]
    return out

  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed + 1)
  return ds.map(convert, num_parallel_calls=AUTOTUNE, deterministic=True)


def shapes_source(config: str = "size64", split: str = "train", *, data_dir: str, seed: int,
                  process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 10_000,
                  use_nouns: bool = False, masks: bool = False) -> tf.data.Dataset:
  """The shapes world through its TFDS builder, generated locally on first use.

  By default its ground-truth noun list is dropped, so nouns come from the captions as for real data.
  `masks`: image + mask examples (mask-supervised training) instead of image + caption.
  """
  ds = tfds_source(f"shapes_world/{config}", split, seed=seed, process_index=process_index,
                   process_count=process_count, data_dir=data_dir, image_key="image", text_key="caption",
                   shuffle_buffer=shuffle_buffer, prepare=process_count == 1, mask_key="mask" if masks else "")
  if masks:
    return ds
  if not use_nouns:
    ds = ds.map(lambda ex: {"image": ex["image"], "text": ex["text"]})
  return ds


def seg_layout_source(layout: str, data_dir: str, split: str = "train", *, seed: int, process_index: int = 0,
                      process_count: int = 1) -> tf.data.Dataset:
  """Image + mask examples from a folder layout the evaluators read (`voc`, `context`, `coco_object`,
  `ade20k`, `generic`; evaluators/seg_datasets.py), in a per-epoch order drawn from the seed.

  Masks are read as the evaluators read them (palette PNGs as ids; ADE20K's 0 -> 255 and k -> k - 1), so
  `config.labels` is the layout's class list (`seg_datasets.load(layout, data_dir).classes`). A file that
  cannot be read drops its example (counted as skipped).
  """
  from groupvit_jax.evaluators import seg_datasets  # pylint: disable=g-import-not-at-top
  if layout not in seg_datasets.LAYOUTS:
    raise ValueError(f"seg_layout: unknown layout {layout!r}; expected one of {sorted(seg_datasets.LAYOUTS)}")
  dataset = seg_datasets.LAYOUTS[layout](data_dir) if layout == "generic" else seg_datasets.LAYOUTS[layout](
      data_dir, split)
  items = dataset.items[process_index::process_count]
  if not items:
    raise ValueError(f"seg_layout {data_dir}: no examples for process {process_index} of {process_count}")
  n = len(dataset.classes)

  def read(image_path, mask_path):
    # Never raises: an unreadable pair comes out empty, and the pp ops (after the examples are numbered,
    # which keeps a resumed stream aligned) drop it as a skipped example.
    try:
      # The image is decoded once, by the pp ops (decode_mask checks that the sizes agree).
      mask = seg_datasets.read_mask(mask_path.decode(), n, dataset.reduce_zero_label)
      with open(image_path, "rb") as f:
        return f.read(), mask.astype(np.uint8)
    except (OSError, ValueError) as e:
      logging.warning("seg_layout: skipping %s: %s", image_path.decode(), e)
      return b"", np.zeros((0, 0), np.uint8)

  def load(image_path, mask_path):
    image, mask = tf.numpy_function(read, [image_path, mask_path], [tf.string, tf.uint8], stateful=False)
    return {"image": tf.ensure_shape(image, []), "mask": tf.ensure_shape(mask, [None, None])}

  paths = tf.data.Dataset.from_tensor_slices(([i[1] for i in items], [i[2] for i in items]))
  paths = paths.shuffle(len(items), seed=seed, reshuffle_each_iteration=True).repeat()
  return paths.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)


def check(cfgs: Sequence[Any]) -> None:
  """The cheap checks, before any model is built: a known kind per source, globs that match files."""
  if not cfgs:
    raise ValueError("input.data lists no source")
  kinds = ("tfrecord", "tfds", "shapes", "seg_layout")
  for cfg in cfgs:
    kind = dict(cfg).get("kind")
    if kind not in kinds:
      raise ValueError(f"input.data: unknown data source kind {kind!r}; expected one of {list(kinds)}")
    if kind == "tfrecord":
      expand_patterns(cfg["patterns"])


def prepare(cfgs: Sequence[Any]) -> None:
  """Generates the datasets that are made locally (the shapes world); call on one process only."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from groupvit_jax.datasets import shapes_tfds  # pylint: disable=g-import-not-at-top,unused-import  (registers)
  for cfg in cfgs:
    cfg = dict(cfg)
    if cfg["kind"] == "shapes":
      tfds.builder(f"shapes_world/{cfg.get('config', 'size64')}", data_dir=cfg["data_dir"]).download_and_prepare()


def build_source(cfg: Any, *, seed: int, process_index: int, process_count: int) -> tf.data.Dataset:
  """One source from its config dict (`kind`: tfrecord | tfds | shapes | seg_layout, plus that kind's
  arguments)."""
  kwargs = {k: v for k, v in dict(cfg).items() if k not in ("kind", "weight")}
  common = dict(seed=seed, process_index=process_index, process_count=process_count)
  builders = {"tfrecord": tfrecord_source, "tfds": tfds_source, "shapes": shapes_source,
              "seg_layout": seg_layout_source}
  if cfg["kind"] not in builders:
    raise ValueError(f"unknown data source kind {cfg['kind']!r}; expected one of {sorted(builders)}")
  ds = builders[cfg["kind"]](**kwargs, **common)
  if "mask" in ds.element_spec:
    return ds
  # Sources agree on one structure so they can be mixed.
  return ds.map(lambda ex: {"image": ex["image"], "text": ex["text"],
                            "nouns": ex.get("nouns", tf.zeros([0], tf.string))})


def mixed_source(cfgs: Sequence[Any], *, seed: int, process_index: int = 0, process_count: int = 1
                 ) -> tf.data.Dataset:
  """Samples the configured sources by their `weight` (default 1), deterministically from the seed."""
  if not cfgs:
    raise ValueError("input.data lists no source")
  datasets = [build_source(c, seed=seed + 7919 * i, process_index=process_index, process_count=process_count)
              for i, c in enumerate(cfgs)]
  if len({"mask" in d.element_spec for d in datasets}) > 1:
    raise ValueError("input.data mixes caption sources with mask sources; a run trains on one kind")
  if len(datasets) == 1:
    return datasets[0]
  weights = [float(dict(c).get("weight", 1.0)) for c in cfgs]
  return tf.data.Dataset.sample_from_datasets(datasets, weights=weights, seed=seed, rerandomize_each_iteration=False)
