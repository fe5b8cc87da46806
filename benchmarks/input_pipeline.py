"""Input-pipeline throughput and noun-extractor quality; prints what it measures.

  python -m benchmarks.input_pipeline [--batches=40] [--workdir=/tmp/gvj_bench_input]

Measures images/s for
  1. the shapes world at 64 px (TFDS, PNG decode, random resized crop, flip, nouns, 3 prompts),
  2. 224-px JPEG TFRecord shards with noun prompts (generated here: shapes-world scenes at 320 px,
     JPEG q90), tokenized in-graph with SentencePiece and with CLIP BPE, on tf.data thread pools of 1, 2
     and all cores (`--threads`),
  each also with the superpixels op (Felzenszwalb on the host) that the superpixel loss needs; a scaling
model (the measured rate per thread times a TPU host's cores against what GroupViT-S needs per host);
the noun extractor's captions/s, and its precision/recall against textblob's POS tagger.
"""

import os
import time

from absl import app, flags
import ml_collections
import numpy as np
import tensorflow as tf

from groupvit_jax import input_pipeline
from groupvit_jax.datasets import shapes
from groupvit_jax.pp import nouns, tokenizers

flags.DEFINE_integer("batches", 40, "Batches to time after warm-up.")
flags.DEFINE_integer("batch_size", 64, "Per-host batch size.")
flags.DEFINE_string("workdir", "/tmp/gvj_bench_input", "Scratch directory for generated data.")
flags.DEFINE_list("threads", ["1", "2", "all"], "tf.data thread-pool sizes for the 224-px rows ('all': every core).")
FLAGS = flags.FLAGS
CAPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                        "captions_sample.txt")


def _jpeg_shards(directory: str, num: int = 1024, size: int = 320) -> str:
  pattern = os.path.join(directory, "jpeg-*.tfrecord")
  if tf.io.gfile.glob(pattern):
    return pattern
  tf.io.gfile.makedirs(directory)
  per_shard = num // 4
  for s in range(4):
    with tf.io.TFRecordWriter(os.path.join(directory, f"jpeg-{s:02d}.tfrecord")) as w:
      for i in range(s * per_shard, (s + 1) * per_shard):
        ex = shapes.render(100, i, size)
        feat = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[tf.io.encode_jpeg(ex["image"], quality=90).numpy()])),
                "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[ex["caption"].encode()]))}
        w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
  return pattern


# GroupViT-S (batch 4096) at the step times docs/launching.md estimates: (slice, step s, hosts, vCPUs per host).
SLICES = (("v4-32", 0.076, 4, 240), ("v5e-64", 0.027, 16, 224))


def _time(config, tokenizer, batches, batch_size, threads=0) -> float:
  config = ml_collections.ConfigDict(config.to_dict())
  config.threads = threads
  ds = input_pipeline.build_train_dataset(config, tokenizer=tokenizer, seed=0, batch_size=batch_size)
  it = input_pipeline.DataIterator(ds)
  for _ in range(5):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  cores = os.cpu_count() or 1
  print(f"host: {cores} CPU cores, tensorflow {tf.__version__}; batch {FLAGS.batch_size}, {FLAGS.batches} batches")
  clip = tokenizers.ClipBpeTokenizer()
  sp_path = os.path.join(FLAGS.workdir, "sp.model")
  if not tf.io.gfile.exists(sp_path):
    tf.io.gfile.makedirs(FLAGS.workdir)
    caps = [shapes.render(0, i)["caption"] for i in range(2000)]
    with open(CAPTIONS) as f:
      caps += [line.strip() for line in f if line.strip()]
    tokenizers.train_sentencepiece(caps, 256, sp_path)
  sp = tokenizers.SentencePieceTokenizer(sp_path)

  rows = []
  shapes_cfg = ml_collections.ConfigDict(dict(
      data=[dict(kind="shapes", config="size64", split="train", data_dir=os.path.join(FLAGS.workdir, "tfds"))],
      pp="decode|random_resized_crop(64)|flip|normalize|nouns|prompts(3)", context_length=77))
  rows.append(("shapes world 64px, sentencepiece", _time(shapes_cfg, sp, FLAGS.batches, FLAGS.batch_size)))
  shapes_cfg.pp = "decode|random_resized_crop(64)|flip|superpixels(8)|normalize|nouns|prompts(3)"
  rows.append(("  + superpixels (patch 8)", _time(shapes_cfg, sp, FLAGS.batches, FLAGS.batch_size)))
  jpeg_cfg = ml_collections.ConfigDict(dict(
      data=[dict(kind="tfrecord", patterns=[_jpeg_shards(os.path.join(FLAGS.workdir, "jpeg"))])],
      pp="random_resized_crop(224)|flip|normalize|nouns|prompts(3)", context_length=77))
  per_thread = {}
  for n in sorted({cores if t == "all" else int(t) for t in FLAGS.threads}):
    for name, tok in (("sentencepiece", sp), ("CLIP BPE", clip)):
      ips = _time(jpeg_cfg, tok, FLAGS.batches, FLAGS.batch_size, threads=n)
      rows.append((f"224px JPEG shards + prompts, {name}, {n} thread{'s' * (n > 1)}", ips))
      if n == 1:
        per_thread[name] = ips
  # Where the 224-px path's time goes, stage by stage (all cores): each row adds one stage.
  class NoTokenizer:
    def tokenize_tf(self, texts, length):
      return tf.zeros(tf.concat([tf.shape(texts), [length]], 0), tf.int32)
  stages = []
  for name, pp, tok in (("read + JPEG decode and crop (224) + flip + normalize", "random_resized_crop(224)|flip|normalize",
                         NoTokenizer()),
                        ("  + nouns + 3 prompts (text, not tokenized)", jpeg_cfg.pp, NoTokenizer()),
                        ("  + sentencepiece", jpeg_cfg.pp, sp), ("  + CLIP BPE instead", jpeg_cfg.pp, clip)):
    cfg = ml_collections.ConfigDict(jpeg_cfg.to_dict())
    cfg.pp = pp
    stages.append((name, _time(cfg, tok, FLAGS.batches, FLAGS.batch_size, threads=cores)))
  jpeg_cfg.pp = "random_resized_crop(224)|flip|superpixels(16)|normalize|nouns|prompts(3)"
  rows.append(("  + superpixels (patch 16), sentencepiece, all cores", _time(jpeg_cfg, sp, FLAGS.batches,
                                                                               FLAGS.batch_size, threads=cores)))
  print(f"\n{'pipeline':<58}{'images/s':>10}")
  for name, ips in rows:
    print(f"{name:<58}{ips:>10.0f}")
  print(f"\n{'224-px path, stage by stage (' + str(cores) + ' threads)':<58}{'images/s':>10}{'ms/image':>10}")
  for name, ips in stages:
    print(f"{name:<58}{ips:>10.0f}{1000 * cores / ips:>10.2f}")
  if per_thread:
    print("\nscaling model (the 1-thread rate times a TPU host's vCPUs, if tf.data scaled linearly) against "
          "GroupViT-S's need per host (batch 4096 at docs/launching.md's estimated step time):")
    for slice_name, step, hosts, vcpus in SLICES:
      need = 4096 / step / hosts
      have = ", ".join(f"{name} {rate * vcpus:,.0f}" for name, rate in per_thread.items())
      print(f"  {slice_name}: needs {need:,.0f} images/s per host; {vcpus} vCPUs x 1-thread rate: {have}")

  with open(CAPTIONS) as f:
    sample = [line.strip() for line in f if line.strip()]
  extractor = nouns.NounExtractor(singular=False)
  captions = tf.constant(sample * 100)
  run = tf.function(lambda c: tf.map_fn(lambda x: tf.strings.reduce_join(extractor.extract(x), separator=" "), c))
  run(captions[:10])
  start = time.perf_counter()
  run(captions)
  cps = len(sample) * 100 / (time.perf_counter() - start)
  print(f"\nnoun extractor (tf.function over 10,000 captions, one core's worth of map_fn): {cps:,.0f} captions/s")
  ds = tf.data.Dataset.from_tensor_slices(captions).map(extractor.extract, num_parallel_calls=tf.data.AUTOTUNE)
  start = time.perf_counter()
  for _ in ds:
    pass
  print(f"noun extractor inside tf.data (parallel map): {len(sample) * 100 / (time.perf_counter() - start):,.0f} captions/s")

  ours = extractor.extract_py(sample)
  tagged = nouns.tagger_nouns(sample)
  print(f"\nagreement with textblob's PatternTagger nouns (NN*), {len(sample)} general captions: "
        f"{nouns.agreement(ours, tagged)}")
  from textblob.en import tag as pattern_tag  # pylint: disable=g-import-not-at-top
  ref_tags = ("NN", "NNS", "NNP", "VBG", "VB", "VBD", "VBN", "VBP", "VBZ")
  ref = [[w.lower() for w, t in pattern_tag(c, tokenize=True) if t in ref_tags] for c in sample]
  print(f"against the reference's tag set (nouns + verbs, what the official code keeps): "
        f"{nouns.agreement(ours, ref)}")
  shape_caps = [shapes.render(1, i)["caption"] for i in range(500)]
  print(f"shapes-world captions (500): {nouns.agreement(extractor.extract_py(shape_caps), nouns.tagger_nouns(shape_caps))}")
  truth = [shapes.render(1, i)["nouns"] for i in range(500)]
  found = nouns.NounExtractor().extract_py(shape_caps)
  recall = np.mean([set(t) <= set(f) for t, f in zip(truth, found)])
  print(f"shapes-world: every object class found in {recall:.1%} of captions")


if __name__ == "__main__":
  app.run(main)
