"""Tokenizers: SentencePiece (in-graph, the default for training from scratch) and CLIP BPE.

Both produce the reference's layout: `[SOT] + tokens + [EOT]`, zero-padded to `length`; a longer text
is cut to `length` with EOT last. SOT and EOT are the two largest ids, because the text tower reads
its feature at the largest id.

- `ClipBpeTokenizer`: CLIP's byte-level BPE (vocab 49408; SOT 49406, EOT 49407), for use with imported
  official weights and CLIP-initialised models. Its merges file ships in this package. It runs inside
  the TF graph, no Python per batch, giving transformers' `CLIPTokenizer` ids: NFC, whitespace runs to
  one space, lowercase (tensorflow_text and tf.strings), CLIP's pre-tokenising regex (RE2), each word's
  UTF-8 bytes as CLIP's byte characters, and CLIP's merges run by SentencePiece's BPE (a model built
  from the merges file: a merge's rank is its piece's score, "</w>" a private-use character, so the
  merges apply in CLIP's order). `encode` is the original SimpleTokenizer in Python (ftfy and HTML
  unescaping first, which transformers' CLIPTokenizer does not do); it and the graph differ only on text
  those repairs change.
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


# "</w>" (CLIP's end-of-word mark) in the SentencePiece form of CLIP's merges: a private-use character.
_END_OF_WORD = "\ue000"
# Stands for U+0000 between the input and the byte mapping (a private-use character of plane 16).
_NUL_STAND_IN = "\U0010fffd"
# The characters Unicode calls White_Space (what transformers' `\s` matches; RE2's `\s` is ASCII only).
_SPACES = r"\t\n\x{0B}\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"
_WHITESPACE = f"[{_SPACES}]"
_CLIP_SPECIAL = r"<\|startoftext\|>|<\|endoftext\|>"
# CLIP's word regex with `\s` spelled out.
_CLIP_WORDS = _CLIP_SPECIAL + r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^" + _SPACES + r"\p{L}\p{N}]+"


@functools.lru_cache(maxsize=None)
def _inert_charsmap() -> bytes:
  """A compiled SentencePiece normalisation map with one rule, U+E001 -> U+E002 (a private-use character
  no byte character or mark of ours is)."""
  import io  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, "rules.tsv")
    with open(rules, "w", encoding="utf-8") as f:
      f.write("E001\tE002\n")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["ab ac", "ad"]), model_writer=out, vocab_size=8,
                                   model_type="char", normalization_rule_tsv=rules, minloglevel=2)
  model = sp_pb2.ModelProto()
  model.ParseFromString(out.getvalue())
  return model.normalizer_spec.precompiled_charsmap


def clip_bpe_sentencepiece(vocab: Sequence[str]) -> bytes:
  """CLIP's BPE as a serialized SentencePiece BPE model whose piece i is CLIP's token i.

  SentencePiece's BPE merges, among adjacent symbols, the pair whose joined piece scores highest. The
  pieces are CLIP's tokens (`</w>` as `_END_OF_WORD`) scored by merge rank (the earliest merge scores
  highest), a word's last character joins its end-of-word mark before any merge (CLIP starts with them
  joined); the special tokens' pieces can never form. No normalisation, no dummy prefix; `<unk>` is
  piece 49408 (never produced: every byte has a character).
  """
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # pylint: disable=g-import-not-at-top
  model = sp_pb2.ModelProto()
  spec = model.trainer_spec
  spec.model_type = sp_pb2.TrainerSpec.BPE
  spec.vocab_size = len(vocab) + 1
  spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = len(vocab), -1, -1, -1
  norm = model.normalizer_spec
  # A character map that changes nothing our inputs contain (an empty one makes every load log a line).
  norm.name, norm.precompiled_charsmap = "user_defined", _inert_charsmap()
  norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = False, False, False
  piece_type = sp_pb2.ModelProto.SentencePiece
  for i, token in enumerate(vocab):
    piece = model.pieces.add()
    if token.startswith("<|"):  # SOT / EOT: placed by the tokenizer itself, never by BPE
      piece.piece, piece.type, piece.score = _END_OF_WORD * 2 + token, piece_type.NORMAL, -1e9
      continue
    piece.piece, piece.type = token.replace("</w>", _END_OF_WORD), piece_type.NORMAL
    piece.score = 0.0 if i < 256 else 1.0 if i < 512 else -float(i - 511)  # bytes; bytes + </w>; merges
  unk = model.pieces.add()
  unk.piece, unk.type = "<unk>", piece_type.UNKNOWN
  return model.SerializeToString()


class ClipBpeTokenizer:
  """CLIP's BPE tokenizer: in-graph (`tokenize_tf`, `__call__`) with transformers' CLIPTokenizer ids;
  `encode`: the original SimpleTokenizer in Python."""

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
    self._vocab = vocab
    self._graph = None  # the TF tables and the SentencePiece op, made on first use

  def _graph_parts(self):
    if self._graph is None:
      import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
      with tf.init_scope():  # made eagerly even when first asked for inside a tf.data function
        self._graph = self._make_graph_parts(tf_text)
    return self._graph

  def _make_graph_parts(self, tf_text):
    byte_chars = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant([bytes([b]) for b in range(256)]),
                                            tf.constant([self.byte_encoder[b] for b in range(256)])), "")
    sp = tf_text.SentencepieceTokenizer(model=clip_bpe_sentencepiece(self._vocab), out_type=tf.int32)
    return byte_chars, sp, tf_text

  def encode_tf(self, texts: tf.Tensor) -> tf.RaggedTensor:
    """1-D string tensor -> ragged `[n, (ids)]` BPE ids (no SOT/EOT added), inside the TF graph.

    As transformers' CLIPTokenizer: `<|startoftext|>` / `<|endoftext|>` written in the raw text are cut
    out first and become their ids; each other segment is normalised (NFC, lowercase, whitespace runs to
    one space), split into words by CLIP's regex, and each word's bytes are BPE-encoded.
    """
    byte_chars, sp, tf_text = self._graph_parts()
    # ICU's lowercasing and the word split stop at a NUL: it travels as _NUL_STAND_IN (also punctuation).
    x = tf.strings.regex_replace(texts, "\x00", _NUL_STAND_IN)
    segments = tf_text.regex_split(x, _CLIP_SPECIAL, _CLIP_SPECIAL)  # [n, (segments)]
    seg = segments.flat_values
    is_sot, is_eot = tf.equal(seg, "<|startoftext|>"), tf.equal(seg, "<|endoftext|>")
    special = tf.logical_or(is_sot, is_eot)
    x = tf_text.normalize_utf8(seg, "NFC")
    # tf.strings.lower lowercases a final capital sigma to the final form; transformers (per character) does not.
    x = tf.strings.lower(tf.strings.regex_replace(x, "\u03a3", "\u03c3"), encoding="utf-8")
    x = tf.strings.regex_replace(x, _WHITESPACE + "+", " ")
    words = tf_text.regex_split(x, _CLIP_WORDS, _CLIP_WORDS)  # [segments, (words)]
    keep = tf.logical_and(tf.not_equal(words.flat_values, " "),  # what lies between words: a space at most
                          tf.logical_not(tf.gather(special, words.value_rowids())))
    words = tf.ragged.boolean_mask(words, words.with_flat_values(keep))
    flat = tf.strings.regex_replace(words.flat_values, _NUL_STAND_IN, "\x00")
    chars = tf.strings.bytes_split(flat)
    mapped = tf.strings.reduce_join(chars.with_flat_values(byte_chars.lookup(chars.flat_values)), axis=1)
    word_ids = words.with_flat_values(sp.tokenize(mapped + _END_OF_WORD)).merge_dims(1, 2)  # [segments, (ids)]
    special_ids = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(tf.where(is_sot, self.sot, self.eot), special),
                                                   tf.cast(special, tf.int64))
    ids = tf.concat([special_ids, tf.cast(word_ids, tf.int32)], axis=1)
    return segments.with_flat_values(ids).merge_dims(1, 2)

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
    return self.tokenize_tf(tf.constant(list(texts), tf.string), length).numpy()

  def tokenize_tf(self, texts: tf.Tensor, length: int) -> tf.Tensor:
    """String tensor of any shape -> int32 `[..., length]`, entirely in the TF graph."""
    shape = tf.shape(texts)
    ids = _pad_ragged(self.encode_tf(tf.reshape(texts, [-1])), self.sot, self.eot, length)
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
