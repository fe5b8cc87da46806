"""The tf.data pipeline: determinism, exact resume, bad input, sources and the webdataset converter."""

import io
import os
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from groupvit_jax import input_pipeline
from groupvit_jax.datasets import sources, webdataset_to_tfrecord
from groupvit_jax.pp import tokenizers

PP = "decode|random_resized_crop(32, scale=(0.5, 1.0))|flip|normalize|nouns|prompts(3)"


@pytest.fixture(scope="module")
def clip():
  return tokenizers.ClipBpeTokenizer()


def _config(data, pp=PP):
  return ml_collections.ConfigDict(dict(data=data, pp=pp, context_length=16))


def _batches(config, clip, n, **kw):
  ds = input_pipeline.build_train_dataset(config, tokenizer=clip, seed=3, batch_size=8, **kw)
  it = input_pipeline.DataIterator(ds, start_index=kw.get("start_index", 0))
  out = []
  for _ in range(n):
    out.append(next(it))
  return out, it


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_are_deterministic_and_resume_exactly(clip, shapes_data_dir):
  config = _config([dict(kind="shapes", config="tiny32", split="train", data_dir=shapes_data_dir)])
  run, it = _batches(config, clip, 6)
  assert run[0]["image"].shape == (8, 32, 32, 3) and run[0]["image"].dtype == np.float32
  assert run[0]["text"].shape == (8, 4, 16) and run[0]["text"].dtype == np.int32
  again, _ = _batches(config, clip, 6)
  _assert_batches_equal(run, again)
  # Position after 3 batches, as a checkpoint would store it.
  _, it3 = _batches(config, clip, 3)
  resumed, _ = _batches(config, clip, 3, start_index=it3.position)
  _assert_batches_equal(run[3:], resumed)


def test_hosts_get_different_data(clip, shapes_data_dir):
  config = _config([dict(kind="shapes", config="tiny32", split="train", data_dir=shapes_data_dir)])
  a, _ = _batches(config, clip, 1, process_index=0, process_count=2)
  b, _ = _batches(config, clip, 1, process_index=1, process_count=2)
  assert not np.array_equal(a[0]["image"], b[0]["image"])


def _jpeg(array, mode=None, fmt="JPEG"):
  buf = io.BytesIO()
  img = Image.fromarray(array)
  if mode:
    img = img.convert(mode)
  img.save(buf, format=fmt)
  return buf.getvalue()


def _write_records(path, records):
  with tf.io.TFRecordWriter(path) as w:
    for image, text in records:
      feat = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
              "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text]))}
      w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())


def test_bad_input_is_skipped_or_handled_and_counted(clip, tmp_path):
  rng = np.random.RandomState(0)
  rgb = rng.randint(0, 255, (48, 48, 3), np.uint8)
  good = _jpeg(rgb)
  records = [
      (good, b"a dog on the grass"),                              # fine
      (b"\xff\xd8\xff" + rng.bytes(500), b"a corrupt cat"),        # corrupt JPEG        -> skipped
      (b"\x89PNG\r\n\x1a\n" + rng.bytes(64), b"a broken png"),     # corrupt PNG         -> skipped
      (good, b"   "),                                             # empty caption       -> skipped
      (good, b"a caf\xe9 table"),                                 # not UTF-8           -> replaced
      (good, b"and then of the"),                                 # no nouns            -> counted
      (_jpeg(rgb, "L"), b"a gray horse"),                         # grayscale           -> RGB
      (_jpeg(rgb, "CMYK"), b"a cmyk boat"),                       # CMYK                -> RGB
      (_jpeg(np.dstack([rgb, rgb[..., :1]]), fmt="PNG"), b"a png bird with alpha"),  # RGBA -> RGB
      (_jpeg(rng.randint(0, 255, (400, 400, 3), np.uint8)), b"an enormous whale"),  # too big -> skipped
      (b"", b"no image at all"),                                  # empty image         -> skipped
  ]
  path = str(tmp_path / "bad.tfrecord")
  _write_records(path, records)
  pp = "decode(max_pixels=100000)|resize(32)|normalize|nouns|prompts(3)"
  config = _config([dict(kind="tfrecord", patterns=[path], shuffle_buffer=1)], pp=pp)
  ds = input_pipeline.build_train_dataset(config, tokenizer=clip, seed=0, batch_size=6)
  it = input_pipeline.DataIterator(ds)
  for _ in range(3):  # 6 good examples per pass over the 11 records
    batch = next(it)
    assert batch["image"].shape == (6, 32, 32, 3) and np.isfinite(batch["image"]).all()
  # Three passes, the last one read up to its last good record (offset 8): 5 + 5 + 3 skipped.
  assert (it.position, it.skipped) == (31, 13), it.counters()
  assert it.no_nouns == 3, it.counters()
  # The random-resized-crop path (which decodes JPEG crops directly) skips the same records.
  config.pp = "random_resized_crop(32, max_pixels=100000)|normalize|nouns|prompts(3)"
  it = input_pipeline.DataIterator(input_pipeline.build_train_dataset(config, tokenizer=clip, seed=0, batch_size=6))
  next(it)
  assert (it.position, it.skipped) == (9, 3), it.counters()


def test_start_up_errors_name_the_problem(clip, tmp_path, shapes_data_dir):
  with pytest.raises(FileNotFoundError, match=r"no files match '.*/nothing-\*\.tfrecord'"):
    sources.expand_patterns([str(tmp_path / "nothing-*.tfrecord")])
  with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset' is not known"):
    sources.tfds_source("no_such_dataset", "train", seed=0, data_dir=shapes_data_dir)
  path = str(tmp_path / "allbad.tfrecord")
  _write_records(path, [(b"not an image", b"a cat")] * 20)
  config = _config([dict(kind="tfrecord", patterns=[path])])
  with pytest.raises(ValueError, match="none of the first 16 examples survives"):
    input_pipeline.build_train_dataset(config, tokenizer=clip, seed=0, batch_size=2)
  with pytest.raises(ValueError, match="unknown pp op 'blur'"):
    input_pipeline.build_train_dataset(_config(config.data, pp="decode|blur(3)"), tokenizer=clip, seed=0,
                                       batch_size=2)


def _write_tar(path, samples):
  with tarfile.open(path, "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_conversion_round_trips(clip, tmp_path):
  rng = np.random.RandomState(1)
  images = [_jpeg(rng.randint(0, 255, (24, 24, 3), np.uint8)) for _ in range(7)]
  captions = [f"a photo of dog number {i}".encode() for i in range(7)]
  samples = []
  for i in range(7):
    samples.append((f"{i:09d}.jpg", images[i]))
    if i != 4:  # sample 4 has no caption: skipped
      samples.append((f"{i:09d}.txt", captions[i]))
  _write_tar(str(tmp_path / "a.tar"), samples[:8])  # samples 0-3
  _write_tar(str(tmp_path / "b.tar"), samples[8:])  # samples 4-6
  out = str(tmp_path / "out")
  counts = webdataset_to_tfrecord.convert([str(tmp_path / "*.tar")], out, examples_per_shard=4,
                                          precompute_nouns=True)
  assert {k: counts[k] for k in ("written", "skipped", "shards")} == {"written": 6, "skipped": 1, "shards": 2}
  assert [(os.path.basename(s["tar"]), s["key"]) for s in counts["skipped_samples"]] == [("b.tar", "000000004")]
  assert counts["damaged_tars"] == []
  assert not tf.io.gfile.glob(os.path.join(out, "*.tmp"))
  records = [tf.train.Example.FromString(r.numpy()) for r in
             tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(os.path.join(out, "*.tfrecord"))))]
  got = {r.features.feature["key"].bytes_list.value[0].decode(): r for r in records}
  for i in (0, 1, 2, 3, 5, 6):
    r = got[f"{i:09d}"]
    assert r.features.feature["jpg"].bytes_list.value[0] == images[i]
    assert r.features.feature["txt"].bytes_list.value[0] == captions[i]
    assert list(r.features.feature["nouns"].bytes_list.value) == [b"photo", b"dog", b"number"]
  # And the converted shards feed the pipeline.
  config = _config([dict(kind="tfrecord", patterns=[os.path.join(out, "*.tfrecord")])])
  batch = next(input_pipeline.DataIterator(input_pipeline.build_train_dataset(config, tokenizer=clip, seed=0,
                                                                              batch_size=4)))
  assert batch["text"].shape == (4, 4, 16)


def test_sources_mix_by_weight(clip, tmp_path):
  rng = np.random.RandomState(2)
  good = _jpeg(rng.randint(0, 255, (24, 24, 3), np.uint8))
  _write_records(str(tmp_path / "a.tfrecord"), [(good, b"a cat from source a")] * 50)
  _write_records(str(tmp_path / "b.tfrecord"), [(good, b"a dog from source b")] * 50)
  data = [dict(kind="tfrecord", patterns=[str(tmp_path / "a.tfrecord")], weight=3.0),
          dict(kind="tfrecord", patterns=[str(tmp_path / "b.tfrecord")], weight=1.0)]
  ds = sources.mixed_source(data, seed=0)
  texts = [ex["text"].numpy() for ex in ds.take(400)]
  share_a = np.mean([t.endswith(b"source a") for t in texts])
  assert 0.65 < share_a < 0.85, share_a  # 3:1 weights
  again = [ex["text"].numpy() for ex in sources.mixed_source(data, seed=0).take(400)]
  assert texts == again  # the mixture is deterministic in the seed


def test_short_prompts_keep_what_fits_and_cut_the_rest_like_the_tokenizer():
  eot = 99
  ids = tf.constant([[98, 5, 6, eot, 0, 0, 0, 0],      # fits in 5
                     [98, 5, 6, 7, eot, 0, 0, 0],      # exactly 5
                     [98, 5, 6, 7, 8, 9, eot, 0]])     # cut: 98 5 6 7 EOT
  short, cut = input_pipeline.short_prompts(ids, 5)
  np.testing.assert_array_equal(short, [[98, 5, 6, eot, 0], [98, 5, 6, 7, eot], [98, 5, 6, 7, eot]])
  np.testing.assert_array_equal(cut, [False, False, True])


def test_prompts_at_their_own_length_match_the_single_array(clip, shapes_data_dir):
  pp = "decode|resize(32)|normalize|nouns|prompts(3, templates='simple')"
  config = _config([dict(kind="shapes", config="tiny32", split="train", data_dir=shapes_data_dir)], pp=pp)
  one, _ = _batches(config, clip, 2)
  config.prompt_length = n = 8  # "a photo of a star." fits in 8 tokens, "... of a hexagon." does not
  apart, it = _batches(config, clip, 2)
  seen = np.zeros(3, int)  # caption slots, noun prompts that fit, noun prompts cut
  for a, b in zip(one, apart):
    assert b["text"].shape == (8, 16) and b["prompts"].shape == (8, 3, n)
    np.testing.assert_array_equal(a["text"][:, 0], b["text"])
    prompts = a["text"][:, 1:]
    caption = (prompts == a["text"][:, :1]).all(-1)  # slots filled with the caption: zeros
    fits = ~prompts[..., n:].any(-1) & ~caption
    cut = ~fits & ~caption
    assert not b["prompts"][caption].any()
    np.testing.assert_array_equal(prompts[fits][:, :n], b["prompts"][fits])  # unchanged where they fit
    np.testing.assert_array_equal(prompts[cut][:, :n - 1], b["prompts"][cut][:, :n - 1])  # else cut, EOT last
    np.testing.assert_array_equal(prompts[cut].max(-1), b["prompts"][cut][:, -1])
    seen += [caption.sum(), fits.sum(), cut.sum()]
  assert seen.all(), seen  # every case occurred
  assert it.counters()["data/prompts_cut"] == seen[2]
