"""Streams webdataset `.tar` shards (`NNN.jpg` + `NNN.txt` members) into TFRecord shards.

  python -m groupvit_jax.datasets.webdataset_to_tfrecord --input='/data/cc3m/*.tar' \
      --output_dir=/data/cc3m_tfrecord --examples_per_shard=10000 [--nouns]

Output: tf.train.Example records in img2dataset's TFRecord schema (`key`, `jpg` (or `png`, `webp`: the
member's extension), `txt`), plus `nouns` when `--nouns` precomputes them with the offline POS tagger
(the pipeline then prefers them to its lexicon). Members are read one sample at a time: shards of any
size stream through in constant memory. A sample without an image or a caption is skipped and counted.
A truncated or corrupt tar keeps every complete sample before the damage, and the conversion goes on
with the next tar. `report.json` beside the shards lists the counts, each skipped sample (tar, key,
reason) and each damaged tar.
"""

import json
import os
import tarfile
from typing import Any, Iterator, Optional

from groupvit_jax import cli  # first: TensorFlow imported with its native start-up lines silenced

import tensorflow as tf

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")


def iter_samples(tar_path: str, damage: Optional[list[dict[str, Any]]] = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Yields (key, {ext: bytes}) per sample; webdataset keeps a sample's members consecutive.

  A tar that ends early or is corrupt stops here: the members read completely so far are still
  yielded, and `{"tar", "after_key", "reason"}` is appended to `damage` (raised when `damage` is None).
  """
  current_key, current = None, {}
  try:
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
      end = tar.offset
    # tarfile reads a file that stops at (or inside) a member's header as a clean end: an archive's end
    # is a zero block, so anything else there means the tar was cut.
    with tf.io.gfile.GFile(tar_path, "rb") as raw:
      raw.seek(end)
      block = raw.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or any(block):
      raise tarfile.ReadError(f"no end-of-archive block at byte {end}: truncated")
  except (tarfile.TarError, EOFError, OSError, tf.errors.OpError) as e:
    if damage is None:
      raise ValueError(f"{tar_path}: truncated or corrupt tar ({type(e).__name__}: {e})") from e
    damage.append({"tar": tar_path, "after_key": current_key, "reason": f"{type(e).__name__}: {e}"})
  if current_key is not None:
    yield current_key, current


def skip_reason(sample: dict[str, bytes]) -> Optional[str]:
  """Why a sample cannot become an example (None when it can)."""
  image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
  if image_ext is None:
    return f"no image member (expected one of {', '.join(IMAGE_EXTS)}; has {', '.join(sorted(sample))})"
  if not sample[image_ext]:
    return f"empty {image_ext} member"
  if next((e for e in TEXT_EXTS if e in sample), None) is None:
    return f"no caption member (expected one of {', '.join(TEXT_EXTS)}; has {', '.join(sorted(sample))})"
  return None


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
            precompute_nouns: bool = False) -> dict[str, Any]:
  """Converts every matching tar; returns (and writes to `report.json`) the report: counts (`written`,
  `skipped`, `shards`), `skipped_samples` (tar, key, reason) and `damaged_tars` (tar, after_key, reason).

  Shards are written to a temporary name and renamed when complete, so an interrupted run never
  leaves a truncated shard under a final name (nor a temporary file: it is removed).
  """
  from groupvit_jax.datasets.sources import expand_patterns  # pylint: disable=g-import-not-at-top
  tagger = None
  if precompute_nouns:
    from groupvit_jax.pp.nouns import tagger_nouns  # pylint: disable=g-import-not-at-top
    tagger = lambda text: tagger_nouns([text])[0]
  tf.io.gfile.makedirs(output_dir)
  counts = {"written": 0, "skipped": 0, "shards": 0}
  skipped, damaged = [], []
  writer, tmp_path, final_path, in_shard = None, None, None, 0

  def close():
    if writer is not None:
      writer.close()
      tf.io.gfile.rename(tmp_path, final_path, overwrite=True)
      counts["shards"] += 1

  try:
    for tar_path in expand_patterns(patterns):
      for key, sample in iter_samples(tar_path, damaged):
        reason = skip_reason(sample)
        if reason is not None:
          counts["skipped"] += 1
          skipped.append({"tar": tar_path, "key": key, "reason": reason})
          continue
        text = next(sample[e] for e in TEXT_EXTS if e in sample).decode("utf-8", "replace")
        ex = make_example(key, sample, tagger(text) if tagger and text else None)
        if writer is None or in_shard >= examples_per_shard:
          close()
          final_path = os.path.join(output_dir, f"shard-{counts['shards']:05d}.tfrecord")
          tmp_path = final_path + ".tmp"
          writer, in_shard = tf.io.TFRecordWriter(tmp_path), 0
        writer.write(ex.SerializeToString())
        in_shard += 1
        counts["written"] += 1
    close()
  except BaseException:
    if writer is not None and tf.io.gfile.exists(tmp_path):  # an unfinished shard is never left behind
      writer.close()
      tf.io.gfile.remove(tmp_path)
    raise
  report = dict(counts, skipped_samples=skipped, damaged_tars=damaged)
  tmp_report = os.path.join(output_dir, "report.json.tmp")
  with tf.io.gfile.GFile(tmp_report, "w") as f:
    json.dump(report, f, indent=1)
  tf.io.gfile.rename(tmp_report, os.path.join(output_dir, "report.json"), overwrite=True)
  return report


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("input", None, "Glob(s) of webdataset .tar shards (local or gs://).", required=True)
  flags.DEFINE_string("output_dir", None, "Where to write shard-NNNNN.tfrecord.", required=True)
  flags.DEFINE_integer("examples_per_shard", 10_000, "Examples per output shard.")
  flags.DEFINE_bool("nouns", False, "Precompute nouns with the offline POS tagger into a `nouns` feature.")

  def _main(argv):
    del argv
    f = flags.FLAGS
    report = convert(f.input, f.output_dir, f.examples_per_shard, f.nouns)
    for d in report["damaged_tars"]:
      print(f"warning: {d['tar']}: truncated or corrupt after sample {d['after_key']!r}, kept the samples "
            f"before ({d['reason']})", file=sys.stderr)
    print(f"wrote {report['written']} examples in {report['shards']} shards to {f.output_dir}; skipped "
          f"{report['skipped']} samples, {len(report['damaged_tars'])} damaged tars (report.json)")

  cli.run(_main)
