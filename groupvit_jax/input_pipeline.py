"""The training input pipeline: source stream -> per-example pp -> batch -> tokenize -> numpy.

Resuming. A source is a fixed sequence given its seed. The pipeline numbers its examples (`index`, per
host) *before* any preprocessing or skipping, derives every random choice of an example from
(seed, index), and drops bad examples after numbering. A batch carries the indices of its examples,
so `position` (last index + 1) says exactly where the stream stands; restarting with
`start_index=position` skips that many raw records (read, not decoded) and yields the very batches an
uninterrupted run would have yielded next. Skipped (bad) examples show up as gaps in the indices and are
counted from them.

Bad input: a corrupt, truncated or over-large image raises inside the per-example map and
`ignore_errors` drops it; an empty caption is filtered; non-UTF-8 bytes in a caption are replaced;
a caption with no nouns gets the caption itself in every prompt slot (counted as `no_nouns`); a mask that
cannot be read or whose size differs from its image's drops its example (mask-supervised sources).
"""

import dataclasses
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf

from groupvit_jax.datasets import sources
from groupvit_jax.pp import ops as pp_ops
from groupvit_jax.pp import tokenizers

AUTOTUNE = tf.data.AUTOTUNE


def _clean_caption(text: tf.Tensor) -> tf.Tensor:
  text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
  return tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))


def preprocess_stream(ds: tf.data.Dataset, pp_spec: str, *, seed: int, start_index: int = 0) -> tf.data.Dataset:
  """Numbers the examples, skips to `start_index`, applies pp ops with per-example seeds, drops bad ones."""
  pp = pp_ops.parse(pp_spec)

  def process(index, ex):
    ex = dict(ex)
    if "text" in ex:
      ex["text"] = _clean_caption(ex["text"])
    ex["_seed"] = tf.stack([tf.constant(seed, tf.int64), index])
    ex = pp(ex)
    ex.pop("_seed")
    ex.pop("nouns", None)  # ragged; prompts already carry what the model needs
    ex["index"] = index
    return ex

  ds = ds.enumerate().skip(start_index)
  ds = ds.map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors()
  if "text" not in ds.element_spec:  # image + mask examples
    return ds
  return ds.filter(lambda ex: tf.strings.length(ex["text"]) > 0)


def check_stream(ds: tf.data.Dataset, pp_spec: str, *, num: int = 16) -> None:
  """Runs the pp ops eagerly on the first `num` examples; raises if none of them survives.

  `ignore_errors` would otherwise spin forever on a source whose every example fails (a wrong
  `image_key`, a directory of non-images): this turns that into one clear error at start.
  """
  pp = pp_ops.parse(pp_spec)
  errors = []
  for i, ex in enumerate(ds.take(num)):
    ex = dict(ex, _seed=tf.constant([0, i], tf.int64))
    if "text" in ex:
      ex["text"] = _clean_caption(ex["text"])
    try:
      pp(ex)
      return
    except (tf.errors.OpError, ValueError) as e:
      errors.append(str(e).strip().splitlines()[0][:200])
  raise ValueError(f"none of the first {num} examples survives preprocessing {pp_spec!r}; first error: "
                   f"{errors[0] if errors else 'the source is empty'}")


def short_prompts(ids: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Token ids `[..., L]` -> the same prompts at `length` tokens, and which did not fit (`[...]` bool).

  A prompt that fits is its first `length` ids (what follows is padding). One that does not is cut
  as the tokenizers cut: the first `length - 1` ids and EOT (the row's largest id) last.
  """
  fits = tf.reduce_all(tf.equal(ids[..., length:], 0), axis=-1)
  last = tf.where(fits, ids[..., length - 1], tf.reduce_max(ids, axis=-1))
  return tf.concat([ids[..., :length - 1], last[..., None]], axis=-1), tf.logical_not(fits)


def batch_and_tokenize(ds: tf.data.Dataset, batch_size: int, tokenizer, context_length: int,
                       prompt_length: Optional[int] = None) -> tf.data.Dataset:
  """Batches and tokenizes caption (+ prompts) into `text` [B, L] or [B, 1 + K, L].

  With `prompt_length`, prompts come separately as `prompts` [B, K, prompt_length] next to `text`
  [B, L] (see `GroupViT.__call__`). A prompt slot that holds the caption itself (a caption with
  fewer than K nouns) is a row of zeros there, which the model reads as "the caption's feature";
  `prompts_cut` counts the other prompts, longer than prompt_length (cut to it, EOT last).
  """
  ds = ds.batch(batch_size, drop_remainder=True)

  if "text" not in ds.element_spec:  # image + mask batches
    return ds.prefetch(AUTOTUNE)

  def tokenize(batch):
    texts = batch.pop("text")
    if "prompts" in batch and prompt_length:
      prompts = batch.pop("prompts")
      is_caption = tf.equal(prompts, texts[:, None])
      short, cut = short_prompts(tokenizer.tokenize_tf(prompts, context_length), prompt_length)
      batch["text"] = tokenizer.tokenize_tf(texts, context_length)
      batch["prompts"] = tf.where(is_caption[..., None], tf.zeros_like(short), short)
      batch["prompts_cut"] = tf.reduce_sum(tf.cast(cut & ~is_caption, tf.int32))
      return batch
    if "prompts" in batch:
      texts = tf.concat([texts[:, None], batch.pop("prompts")], axis=1)
    batch["text"] = tokenizer.tokenize_tf(texts, context_length)
    return batch

  return ds.map(tokenize, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def build_train_dataset(config: Any, *, tokenizer, seed: int, batch_size: int, start_index: int = 0,
                        process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """The host's training batches from `config.input` (see configs/ for the fields).

  Args:
    config: the `input` ConfigDict (`data`: source list, `pp`: op string, `context_length`, optional
      `prompt_length`).
    tokenizer: from `pp.tokenizers.get_tokenizer`.
    seed: data seed (the same on every host; hosts differ by their share of the data).
    batch_size: per-host batch size.
    start_index: the position to resume from (`DataIterator.position` of the stopped run).
  """
  ds = sources.mixed_source(config.data, seed=seed, process_index=process_index, process_count=process_count)
  check_stream(ds, config.pp)
  ds = preprocess_stream(ds, config.pp, seed=seed + process_index, start_index=start_index)
  ds = batch_and_tokenize(ds, batch_size, tokenizer, config.context_length, config.get("prompt_length"))
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.get("threads", 0)
  return ds.with_options(options)


@dataclasses.dataclass
class DataIterator:
  """Numpy batches with the stream position and bad-sample counters.

  `position` is what a checkpoint stores, with the running counters (`running_totals`, from which a
  resumed iterator continues): `skipped` counts examples dropped, `no_nouns` captions whose prompts are
  all the caption itself, `prompts_cut` noun prompts longer than `prompt_length` (cut to it, EOT last).
  """
  dataset: tf.data.Dataset
  start_index: int = 0
  position: int = 0
  skipped: int = 0
  no_nouns: int = 0
  prompts_cut: int = 0
  _it: Optional[Iterator[dict[str, np.ndarray]]] = None

  def __post_init__(self):
    self.position = self.start_index

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset.as_numpy_iterator()
    batch = next(self._it)
    index = batch.pop("index")
    self.skipped += int(index[-1] + 1 - self.position - len(index))
    self.position = int(index[-1] + 1)
    self.no_nouns += int(batch.pop("no_nouns", np.zeros(0)).sum())
    self.prompts_cut += int(batch.pop("prompts_cut", 0))
    return batch

  def running_totals(self) -> dict[str, int]:
    """The counters a checkpoint keeps (constructor arguments of a resumed iterator)."""
    return {"skipped": self.skipped, "no_nouns": self.no_nouns, "prompts_cut": self.prompts_cut}

  def counters(self) -> dict[str, int]:
    return {"data/skipped_examples": self.skipped, "data/no_noun_captions": self.no_nouns,
            "data/prompts_cut": self.prompts_cut,
            "data/position": self.position}


def get_tokenizer(config: Any):
  """The tokenizer named by `config.input.tokenizer`."""
  return tokenizers.get_tokenizer(config.input.tokenizer)
