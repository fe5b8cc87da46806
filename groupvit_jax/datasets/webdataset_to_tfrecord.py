"""Streams webdataset `.tar` shards (`NNN.jpg` + `NNN.txt` members) into TFRecord shards.

  python -m groupvit_jax.datasets.webdataset_to_tfrecord --input='/data/cc3m/*.tar' \
      --output_dir=/data/cc3m_tfrecord --examples_per_shard=10000 [--nouns]

Output: tf.train.Example records in img2dataset's TFRecord schema (`key`, `jpg` (or `png`, `webp`: the
member's extension), `txt`), plus `nouns` when `--nouns` precomputes them with the offline POS tagger
(the pipeline then prefers them to its lexicon). Members are read one sample at a time: shards of any
size stream through in constant memory. A sample without an image or a caption is skipped and counted.
"""

import os
import tarfile
from typing import Iterator, Optional

import tensorflow as tf

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")


def iter_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Yields (key, {ext: bytes}) per sample; webdataset keeps a sample's members consecutive."""
  current_key, current = None, {}
  with tf.io.gfile.GFile(tar_path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      if "." not in base:
        continue
      key, ext = base.split(".", 1)
      key = os.path.join(os.path.dirname(member.name), key)
      if key != current_key and current_key is not None:
        yield current_key, current
        current = {}
      current_key = key
      current[ext.lower()] = tar.extractfile(member).read()
  if current_key is not None:
    yield current_key, current


def make_example(key: str, sample: dict[str, bytes], nouns: Optional[list[str]] = None
                 ) -> Optional[tf.train.Example]:
  """A tf.train.Example in img2dataset's schema, or None when the image or caption is missing."""
  image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
  text_ext = next((e for e in TEXT_EXTS if e in sample), None)
  if image_ext is None or text_ext is None or not sample[image_ext]:
    return None
  feature = {
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
      ("jpg" if image_ext == "jpeg" else image_ext): tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[sample[image_ext]])),
      "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sample[text_ext].strip()])),
  }
  if nouns is not None:
    feature["nouns"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[n.encode() for n in nouns]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def convert(patterns: list[str], output_dir: str, examples_per_shard: int = 10_000,
            precompute_nouns: bool = False) -> dict[str, int]:
  """Converts every matching tar; returns counts (`written`, `skipped`, `shards`).

  Shards are written to a temporary name and renamed when complete, so an interrupted run never
  leaves a truncated shard under a final name.
  """
  from groupvit_jax.datasets.sources import expand_patterns  # pylint: disable=g-import-not-at-top
  tagger = None
  if precompute_nouns:
    from groupvit_jax.pp.nouns import tagger_nouns  # pylint: disable=g-import-not-at-top
    tagger = lambda text: tagger_nouns([text])[0]
  tf.io.gfile.makedirs(output_dir)
  counts = {"written": 0, "skipped": 0, "shards": 0}
  writer, tmp_path, final_path, in_shard = None, None, None, 0

  def close():
    if writer is not None:
      writer.close()
      tf.io.gfile.rename(tmp_path, final_path, overwrite=True)
      counts["shards"] += 1

  for tar_path in expand_patterns(patterns):
    for key, sample in iter_samples(tar_path):
      text = next((sample[e] for e in TEXT_EXTS if e in sample), b"").decode("utf-8", "replace")
      ex = make_example(key, sample, tagger(text) if tagger and text else None)
      if ex is None:
        counts["skipped"] += 1
        continue
      if writer is None or in_shard >= examples_per_shard:
        close()
        final_path = os.path.join(output_dir, f"shard-{counts['shards']:05d}.tfrecord")
        tmp_path = final_path + ".tmp"
        writer, in_shard = tf.io.TFRecordWriter(tmp_path), 0
      writer.write(ex.SerializeToString())
      in_shard += 1
      counts["written"] += 1
  close()
  return counts


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("input", None, "Glob(s) of webdataset .tar shards (local or gs://).", required=True)
  flags.DEFINE_string("output_dir", None, "Where to write shard-NNNNN.tfrecord.", required=True)
  flags.DEFINE_integer("examples_per_shard", 10_000, "Examples per output shard.")
  flags.DEFINE_bool("nouns", False, "Precompute nouns with the offline POS tagger into a `nouns` feature.")

  def _main(argv):
    del argv
    f = flags.FLAGS
    print(convert(f.input, f.output_dir, f.examples_per_shard, f.nouns))

  app.run(_main)
