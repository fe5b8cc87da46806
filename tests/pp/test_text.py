"""Tokenizers, noun extraction and prompts."""

import gzip
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from groupvit_jax.datasets import shapes
from groupvit_jax.pp import nouns, templates, tokenizers

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def _captions():
  with open(os.path.join(DATA, "captions_sample.txt")) as f:
    return [line.strip() for line in f if line.strip()]


@pytest.fixture(scope="module")
def clip():
  return tokenizers.ClipBpeTokenizer()


def test_clip_bpe_ids_match_hf_clip_tokenizer(clip, tmp_path):
  """The Python path (the original SimpleTokenizer) on text its ftfy / HTML repairs leave alone."""
  hf = _hf_clip_tokenizer(clip, tmp_path)
  extra = ["Café au lait, naïve résumé", "It's 3:45pm — don't stop!!", "emoji 🚀 rocket", "  MiXeD   CaSe  ",
           "a" * 300]
  texts = _captions() + [ex["caption"] for ex in map(lambda i: shapes.render(0, i), range(50))] + extra
  for text in texts:
    assert clip.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
  assert (clip.vocab_size, clip.sot, clip.eot) == (49408, 49406, 49407)


def _hf_clip_tokenizer(clip, tmp_path):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  with gzip.open(tokenizers.CLIP_BPE_PATH) as f:
    merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  (tmp_path / "vocab.json").write_text(json.dumps(clip.encoder))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def varied_captions(n, seed=0):
  """Captions mixing words, punctuation, numbers, emoji, non-Latin scripts, HTML entities, long words,
  odd whitespace, case and composed / decomposed accents; and empty ones."""
  rng = np.random.default_rng(seed)
  pieces = [
      "a", "photo", "of", "the", "Dog", "CAT", "running", "on", "grass", "It's", "don't", "we'll", "I'M", "they'd",
      "!!", "...", "?", "—", "–", "(", ")", "[x]", '"quoted"', "'single'", "#hashtag", "@user", "http://x.co/a?b=1",
      "3:45pm", "2024", "1,000.50", "42%", "½", "٣٤", "१२", "Ⅻ", "x²",
      "🚀", "👍🏽", "🏳️‍🌈", "❤️", "👩‍👩‍👧", "🇯🇵", "☕",
      "猫がいる", "北京欢迎你", "مرحبا بالعالم", "नमस्ते", "Привет МИР", "ΣΟΦΟΣ", "σοφός", "Ὀδυσσεύς", "안녕하세요",
      "สวัสดี", "שלום", "İstanbul", "ǅemal", "Straße", "ẞ", "Åland", "ＬＯＵＤ", "ｶﾀｶﾅ", "ﬁne",
      "&amp;", "&lt;b&gt;", "&#39;", "&nbsp;", "&quot;hi&quot;", "AT&T", "&copy;",
      "cafe\u0301", "café", "nai\u0308ve", "e\u0301\u0301",
      "a" * 300, "supercalifragilistic" * 6, "x" * 77, "Ab" * 40,
      "<|endoftext|>", "<|startoftext|>", "\x00", "\u200b", "\ufeff",
  ]
  spaces = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u2009", " \r\n ", ""]
  out = ["", " ", "\t\n", "\u3000"]
  while len(out) < n:
    k = int(rng.integers(1, 14))
    words = [pieces[int(i)] for i in rng.integers(0, len(pieces), k)]
    out.append("".join(w + spaces[int(rng.integers(0, len(spaces)))] for w in words))
  return out


def test_in_graph_clip_bpe_gives_transformers_clip_tokenizer_ids(clip, tmp_path):
  """The graph path (no Python per batch) against transformers' CLIPTokenizer, text by text."""
  hf = _hf_clip_tokenizer(clip, tmp_path)
  texts = varied_captions(1200) + _captions() + [shapes.render(0, i)["caption"] for i in range(50)]
  got = clip.encode_tf(tf.constant(texts)).to_list()
  for text, ids in zip(texts, got):
    assert ids == hf(text, add_special_tokens=False)["input_ids"], repr(text)
  # The padded layout: SOT, the ids, EOT, zeros; a long text cut with EOT last.
  padded = clip(texts[:50], 77)
  for text, row, ids in zip(texts, padded, got):
    want = [clip.sot] + ids[:75] + [clip.eot]
    assert list(row[:len(want)]) == want and not row[len(want):].any(), repr(text)


def test_clip_bpe_in_the_pipeline_runs_no_python(clip):
  """The tokenizer's graph inside a tf.data map holds no py_function / numpy_function."""
  ds = tf.data.Dataset.from_tensor_slices(["a photo of a dog", "two cats"]).batch(2)
  ds = ds.map(lambda t: clip.tokenize_tf(t, 16))
  graph = tf.compat.v1.GraphDef()
  graph.ParseFromString(ds._as_serialized_graph().numpy())  # pylint: disable=protected-access
  ops = {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}
  assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, ops
  assert "SentencepieceOp" in ops or any("Sentencepiece" in op for op in ops), ops
  np.testing.assert_array_equal(next(iter(ds)).numpy(), clip(["a photo of a dog", "two cats"], 16))


def test_clip_layout_pads_and_cuts_with_eot_last(clip):
  ids = clip(["a photo of a dog.", "word " * 100], length=77)
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[0, 0] == clip.sot and ids[0, ids[0].argmax()] == clip.eot and ids[0, -1] == 0
  assert ids[1, -1] == clip.eot and (ids[1] != 0).all()
  # The reference unescapes HTML entities (HF's CLIPTokenizer does not).
  assert clip.encode("fish &amp; chips") == clip.encode("fish & chips")
  in_graph = clip.tokenize_tf(tf.constant([["a photo of a dog."], ["word " * 100]]), 77).numpy()
  np.testing.assert_array_equal(in_graph[:, 0], ids)


def test_sentencepiece_trains_and_tokenizes_in_graph(tmp_path):
  caps = [shapes.render(0, i)["caption"] for i in range(500)]
  path = tokenizers.train_sentencepiece(caps, 64, str(tmp_path / "sp.model"))
  tok = tokenizers.SentencePieceTokenizer(path)
  assert tok.vocab_size == tok.eot + 1 and tok.sot == tok.eot - 1
  ids = tok.tokenize_tf(tf.constant(["a red circle", "two  SHAPES: a star" * 20]), 16).numpy()
  assert ids.shape == (2, 16)
  assert ids[0, 0] == tok.sot and ids[0].max() == tok.eot and ids[0, -1] == 0
  assert ids[1, -1] == tok.eot
  np.testing.assert_array_equal(tok(["a red circle"], 16)[0], ids[0])


def test_unknown_tokenizer_spec_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
    tokenizers.get_tokenizer("bert")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizers.get_tokenizer("sentencepiece:/nope.model")


def test_noun_extractor_agrees_with_the_pos_tagger():
  caps = _captions()
  ours = nouns.NounExtractor(singular=False).extract_py(caps)
  score = nouns.agreement(ours, nouns.tagger_nouns(caps))
  assert score["precision"] >= 0.95 and score["recall"] >= 0.95, score


def test_noun_extractor_finds_every_shape_and_singularises():
  extractor = nouns.NounExtractor()
  for i in range(100):
    ex = shapes.render(0, i)
    found = extractor.extract_py([ex["caption"]])[0]
    assert set(ex["nouns"]) <= set(found), (ex["caption"], found)
  assert extractor.extract_py(["Two red CIRCLES and the dog's bones"])[0] == ["circle", "dog", "bone"]
  assert extractor.extract_py(["", "and the of"]) == [[], []]


def test_prompts_pick_nouns_and_fill_with_the_caption():
  seed = tf.constant([1, 2], tf.int64)
  caption = tf.constant("a red circle and a star")
  out, m = nouns.make_prompts(caption, tf.constant(["circle", "star"]), 3, seed, templates.TEMPLATES["simple"])
  out = [p.decode() for p in out.numpy()]
  assert int(m) == 2
  assert sorted(out[:2]) == ["a photo of a circle.", "a photo of a star."]
  assert out[2] == "a red circle and a star"
  none, m0 = nouns.make_prompts(caption, tf.zeros([0], tf.string), 3, seed)
  assert int(m0) == 0 and all(p == caption.numpy() for p in none.numpy())
  # Deterministic in the seed, different across seeds.
  many = tf.constant([f"noun{i}" for i in range(20)])
  a = nouns.make_prompts(caption, many, 3, seed)[0].numpy()
  b = nouns.make_prompts(caption, many, 3, seed)[0].numpy()
  c = nouns.make_prompts(caption, many, 3, tf.constant([1, 3], tf.int64))[0].numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
