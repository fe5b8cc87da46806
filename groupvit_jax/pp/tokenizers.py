"""Tokenizers: SentencePiece (in-graph, the default for training from scratch) and CLIP BPE.

Both produce the reference's layout: `[SOT] + tokens + [EOT]`, zero-padded to `length`; a longer text
is cut to `length` with EOT last. SOT and EOT are the two largest ids, because the text tower reads
its feature at the largest id.

- `ClipBpeTokenizer`: CLIP's byte-level BPE (vocab 49408; SOT 49406, EOT 49407), the same ids as the
  reference, for use with imported official weights. Its merges file ships in this package.
  Tokenising inside tf.data runs Python (`tf.numpy_function`, one call per batch, with a word cache).
- `SentencePieceTokenizer`: runs inside the TF graph (tensorflow_text); SOT = V and EOT = V + 1 for an
  SP model of V pieces, so the model's vocab_size is V + 2. Train a model with
  `python -m groupvit_jax.pp.tokenizers --captions=captions.txt --vocab_size=8000 --output=sp.model`.
"""

import functools
import gzip
import html
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex
import tensorflow as tf

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLIP_BPE_PATH = os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
  """CLIP's reversible byte -> printable unicode character map."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
       list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
  """The reference's normalisation: ftfy, HTML unescape (twice), whitespace collapse, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


class ClipBpeTokenizer:
  """CLIP's BPE tokenizer (identical ids to the reference's SimpleTokenizer)."""

  _PATTERN = regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
      regex.IGNORECASE)

  def __init__(self, bpe_path: str = CLIP_BPE_PATH):
    with gzip.open(bpe_path) as f:
      merges = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    self.byte_encoder = _bytes_to_unicode()
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
    self.sot = self.encoder["<|startoftext|>"]
    self.eot = self.encoder["<|endoftext|>"]
    self.vocab_size = len(vocab)
    self._bpe = functools.lru_cache(maxsize=1 << 18)(self._bpe_uncached)

  def _bpe_uncached(self, token: str) -> tuple[str, ...]:
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def encode(self, text: str) -> list[int]:
    """Text -> BPE ids (no SOT/EOT)."""
    ids = []
    for token in self._PATTERN.findall(clean_text(text)):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(token))
    return ids

  def __call__(self, texts: Sequence[str], length: int = 77) -> np.ndarray:
    """Texts -> `[len(texts), length]` int32 ids with SOT/EOT, zero-padded, cut with EOT last."""
    out = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot] + self.encode(text)[:length - 2] + [self.eot]
      out[i, :len(ids)] = ids
    return out

  def tokenize_tf(self, texts: tf.Tensor, length: int) -> tf.Tensor:
    """In a tf.data graph: string tensor of any shape -> int32 `[..., length]` (runs Python)."""
    def run(flat):
      return self([t.decode("utf-8", "replace") for t in flat], length)
    shape = tf.shape(texts)
    ids = tf.numpy_function(run, [tf.reshape(texts, [-1])], tf.int32, stateful=False)
    return tf.reshape(ids, tf.concat([shape, [length]], 0))


def _pad_ragged(ids: tf.RaggedTensor, sot: int, eot: int, length: int) -> tf.Tensor:
  """Ragged ids `[n, (tokens)]` -> `[n, length]` with SOT/EOT, zero padding, EOT kept when cut."""
  ids = ids[:, :length - 2]
  n = ids.nrows()
  sot_col = tf.RaggedTensor.from_tensor(tf.fill([n, 1], tf.cast(sot, ids.dtype)))
  eot_col = tf.RaggedTensor.from_tensor(tf.fill([n, 1], tf.cast(eot, ids.dtype)))
  ids = tf.concat([sot_col, ids, eot_col], axis=1)
  return ids.to_tensor(default_value=0, shape=[None, length])


class SentencePieceTokenizer:
  """In-graph SentencePiece tokenizer with SOT = V, EOT = V + 1 appended beyond the SP vocabulary."""

  def __init__(self, model_path: str):
    import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
    with tf.io.gfile.GFile(model_path, "rb") as f:
      self.model_proto = f.read()
    self._sp = tf_text.SentencepieceTokenizer(model=self.model_proto, out_type=tf.int32)
    size = int(self._sp.vocab_size().numpy())
    self.sot, self.eot = size, size + 1
    self.vocab_size = size + 2

  def tokenize_tf(self, texts: tf.Tensor, length: int) -> tf.Tensor:
    """String tensor of any shape -> int32 `[..., length]`, entirely in the TF graph."""
    shape = tf.shape(texts)
    flat = tf.reshape(texts, [-1])
    flat = tf.strings.strip(tf.strings.regex_replace(tf.strings.lower(flat), r"\s+", " "))
    ids = _pad_ragged(self._sp.tokenize(flat), self.sot, self.eot, length)
    return tf.reshape(ids, tf.concat([shape, [length]], 0))

  def __call__(self, texts: Sequence[str], length: int = 77) -> np.ndarray:
    return self.tokenize_tf(tf.constant(list(texts)), length).numpy()


def train_sentencepiece(captions: Iterable[str], vocab_size: int, output: str) -> str:
  """Trains a unigram SentencePiece model on lowercased captions; writes it to `output`."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(regex.sub(r"\s+", " ", c.lower()).strip() for c in captions),
      model_writer=model, vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
      minloglevel=1)  # warnings and errors only: its INFO log is ~100 lines per model
  with tf.io.gfile.GFile(output, "wb") as f:
    f.write(model.getvalue())
  return output


def get_tokenizer(spec: str):
  """`"clip_bpe"` or `"sentencepiece:/path/to/model"` -> a tokenizer with `tokenize_tf` and `vocab_size`."""
  kind, _, arg = spec.partition(":")
  if kind == "clip_bpe":
    return ClipBpeTokenizer(arg or CLIP_BPE_PATH)
  if kind == "sentencepiece":
    if not arg:
      raise ValueError("tokenizer 'sentencepiece' needs a model path: 'sentencepiece:/path/to/sp.model'")
    return SentencePieceTokenizer(arg)
  raise ValueError(f"unknown tokenizer {spec!r}; expected 'clip_bpe' or 'sentencepiece:<model path>'")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  with tf.io.gfile.GFile(f.captions) as fh:
    captions = [line.strip() for line in fh if line.strip()]
  if not captions:
    raise ValueError(f"{f.captions}: no captions (expected one per line)")
  train_sentencepiece(captions, f.vocab_size, f.output)
  print(f"trained a {f.vocab_size}-piece SentencePiece model on {len(captions)} captions -> {f.output}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("captions", None, "Text file, one caption per line.", required=True)
  flags.DEFINE_integer("vocab_size", 8000, "Pieces in the model (the text tower's vocab is this + 2).")
  flags.DEFINE_string("output", None, "Where to write the .model file.", required=True)
  app.run(main)
