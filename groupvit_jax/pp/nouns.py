"""Noun extraction inside the TF graph, from a shipped lexicon, and multi-label prompt building.

The reference POS-tags every caption in Python (nltk), which starves accelerators. Here a static hash
table maps lowercase words to their singular noun form (or nothing); extraction is a handful of
tf.strings ops per caption. The lexicon (`assets/noun_lexicon.tsv.gz`) is built from the Brill/Penn
lexicon that textblob ships: words whose most frequent tag is NN or NNS map to their singular, other
known words to "-", plus the shapes-world vocabulary; words it does not know count as nouns (as the
tagger guesses for unknown lowercase words). Rebuild it with
`python -m groupvit_jax.pp.nouns --build_lexicon`.

Differences from the reference's tagger (measured in the README): no context (a word is a noun if it
usually is), no proper nouns (captions are lowercased), no verbs (the reference also keeps VB* tags),
and duplicate nouns in one caption count once.
"""

import functools
import gzip
import os
from typing import Iterable, Sequence

import tensorflow as tf

from groupvit_jax.pp.templates import TEMPLATES

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
LEXICON_PATH = os.path.join(ASSETS, "noun_lexicon.tsv.gz")
# Nouns the shapes world relies on, whatever the general lexicon says ("cross" is usually a verb).
_FORCED = {w: w for w in ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon",
                          "shape", "background")}
_FORCED.update({"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star",
                "hearts": "heart", "crosses": "cross", "diamonds": "diamond", "hexagons": "hexagon",
                "shapes": "shape"})
_WORD_RE = r"[^\p{L}\-]+"  # Anything but letters and hyphens separates words.
NOT_A_NOUN = "-"  # Lexicon value of known words that are usually not nouns.
_UNKNOWN = "?"  # Words the lexicon does not know are taken as nouns, as the tagger does.


def build_lexicon(output: str = LEXICON_PATH) -> int:
  """Writes the noun lexicon (word -> singular) from textblob's tagger lexicon; returns its size."""
  import textblob  # pylint: disable=g-import-not-at-top
  from textblob import Word  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(textblob.__file__), "en", "en-lexicon.txt")
  entries = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith(";;;"):
        continue
      parts = line.split()
      if len(parts) < 2:
        continue
      word, tag = parts[0], parts[1]
      if not word.isalpha() or not word.islower():
        continue
      if tag == "NNS":
        entries[word] = str(Word(word).singularize())
      elif tag == "NN" and len(word) > 1:
        entries[word] = word
      else:
        entries[word] = NOT_A_NOUN
  entries.update(_FORCED)
  with gzip.open(output, "wt", encoding="utf-8") as f:
    for word in sorted(entries):
      f.write(f"{word}\t{entries[word]}\n")
  return len(entries)


@functools.lru_cache(maxsize=None)
def _lexicon(path: str = LEXICON_PATH) -> tuple[list[str], list[str]]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    pairs = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  return [p[0] for p in pairs], [p[1] for p in pairs]


class NounExtractor:
  """`extract(caption)` -> 1-D string tensor of the caption's nouns (first occurrence order)."""

  def __init__(self, lexicon_path: str = LEXICON_PATH, singular: bool = True):
    words, lemmas = _lexicon(lexicon_path)
    self.singular = singular
    self.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(words), tf.constant(lemmas)), default_value=_UNKNOWN)

  def words(self, caption: tf.Tensor) -> tf.Tensor:
    text = tf.strings.lower(caption, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"'s\b", " ")
    return tf.strings.split(tf.strings.regex_replace(text, _WORD_RE, " "))

  def extract(self, caption: tf.Tensor) -> tf.Tensor:
    """Scalar caption -> `[num_nouns]` nouns (singular forms if `singular`), deduplicated."""
    words = self.words(caption)
    lemmas = self.table.lookup(words)
    unknown = tf.equal(lemmas, _UNKNOWN)
    lemmas = tf.where(unknown, words, lemmas)
    # Unknown words become nouns when they look like words (3+ letters, no hyphen at the ends).
    plausible = tf.strings.regex_full_match(words, r"\p{L}[\p{L}\-]*\p{L}\p{L}")
    keep = tf.logical_and(tf.not_equal(lemmas, NOT_A_NOUN), tf.logical_or(~unknown, plausible))
    nouns = tf.boolean_mask(lemmas if self.singular else words, keep)
    return tf.unique(nouns).y

  def extract_py(self, captions: Sequence[str]) -> list[list[str]]:
    """Convenience for evaluation: Python strings in, Python lists out."""
    return [[n.decode() for n in self.extract(tf.constant(c)).numpy()] for c in captions]


def make_prompts(caption: tf.Tensor, nouns: tf.Tensor, k: int, seed: tf.Tensor,
                 templates: Sequence[str] = TEMPLATES["full"]) -> tuple[tf.Tensor, tf.Tensor]:
  """K prompt texts from up to K randomly picked nouns; missing slots repeat the caption.

  Args:
    caption: scalar string.
    nouns: `[n]` strings.
    k: prompts per caption.
    seed: int64 `[2]` stateless seed (derive it from the example index for determinism).
    templates: format strings with one "{}".
  Returns:
    (`[k]` prompt strings, scalar int32 number of noun prompts).
  """
  prefixes = tf.constant([t.split("{}")[0] for t in templates])
  suffixes = tf.constant([t.split("{}")[1] for t in templates])
  seed_pick = tf.random.experimental.stateless_fold_in(seed, 1)
  seed_tmpl = tf.random.experimental.stateless_fold_in(seed, 2)
  n = tf.size(nouns)
  m = tf.minimum(n, k)
  chosen = tf.random.experimental.stateless_shuffle(nouns, seed_pick)[:m]
  which = tf.random.stateless_uniform([m], seed_tmpl, 0, len(templates), dtype=tf.int32)
  prompts = tf.strings.join([tf.gather(prefixes, which), chosen, tf.gather(suffixes, which)])
  prompts = tf.concat([prompts, tf.fill([k - m], caption)], axis=0)
  return tf.ensure_shape(prompts, [k]), m


def tagger_nouns(captions: Iterable[str]) -> list[list[str]]:
  """Nouns (NN, NNS, NNP, NNPS; lowercased) by textblob's offline PatternTagger: the reference point."""
  from textblob.en import tag as pattern_tag  # pylint: disable=g-import-not-at-top  (pattern's own tokenizer: no nltk data)
  out = []
  for c in captions:
    tags = pattern_tag(c, tokenize=True)
    seen = []
    for word, tag in tags:
      w = word.lower()
      if tag.startswith("NN") and w not in seen:
        seen.append(w)
    out.append(seen)
  return out


def agreement(ours: list[list[str]], reference: list[list[str]]) -> dict[str, float]:
  """Micro precision/recall/F1 of extracted surface nouns against reference nouns."""
  tp = fp = fn = 0
  for a, b in zip(ours, reference):
    a, b = set(a), set(b)
    tp += len(a & b)
    fp += len(a - b)
    fn += len(b - a)
  precision = tp / max(tp + fp, 1)
  recall = tp / max(tp + fn, 1)
  return {"precision": precision, "recall": recall,
          "f1": 2 * precision * recall / max(precision + recall, 1e-9), "captions": len(ours)}


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool("build_lexicon", False, "Rebuild assets/noun_lexicon.tsv.gz from textblob's lexicon.")
  flags.DEFINE_string("captions", None, "Measure agreement with the tagger on these captions (one a line).")

  def _main(argv):
    del argv
    f = flags.FLAGS
    if f.build_lexicon:
      print(f"wrote {build_lexicon()} nouns to {LEXICON_PATH}")
    if f.captions:
      with open(f.captions, encoding="utf-8") as fh:
        caps = [line.strip() for line in fh if line.strip()]
      ours = NounExtractor(singular=False).extract_py(caps)
      print(agreement(ours, tagger_nouns(caps)))

  app.run(_main)
