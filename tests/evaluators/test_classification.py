"""Zero-shot classification on a class-folder set: top-k against a definition, the CLI, bad folders."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from groupvit_jax import checkpoint, config_lib
from groupvit_jax.datasets import shapes
from groupvit_jax.evaluators import classification
from groupvit_jax.evaluators.segmentation import class_embeddings
from groupvit_jax.models import build_model, init_variables
from groupvit_jax.models.groupvit import l2_normalize
from groupvit_jax.pp.tokenizers import ClipBpeTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _folder(root, per_class=3, size=40):
  """Shapes-world images filed under the class of their first object."""
  counts = {}
  i = 0
  while min(counts.get(c, 0) for c in shapes.CLASSES[:4]) < per_class:
    ex = shapes.render(5, i, size)
    i += 1
    cls = ex["nouns"][0]
    if cls not in shapes.CLASSES[:4] or counts.get(cls, 0) >= per_class:
      continue
    counts[cls] = counts.get(cls, 0) + 1
    os.makedirs(os.path.join(root, f"c_{cls}"), exist_ok=True)
    Image.fromarray(ex["image"]).save(os.path.join(root, f"c_{cls}", f"{i}.png"))
  with open(os.path.join(root, "classnames.txt"), "w") as f:
    f.write("".join(f"c_{c}\t{c}\n" for c in shapes.CLASSES[:4]))
  return root


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.load_config("configs/tiny.py")
  model = build_model(config.model)
  variables = nn.unbox(jax.jit(lambda r: init_variables(model, r, 32, 16))(jax.random.key(3)))
  return config, model, variables


def _topk_by_definition(logits, labels, k):
  """Hit when fewer than k classes score strictly higher than the true one."""
  return 100 * np.mean([np.sum(row > row[y]) < k for row, y in zip(logits, labels)])


def test_accuracy_matches_the_definition(tiny, tmp_path):
  config, model, variables = tiny
  folder = classification.load_folder(_folder(str(tmp_path / "set")))
  assert folder.classes == shapes.CLASSES[:4] and len(folder.items) == 12
  tok = ClipBpeTokenizer()
  result = classification.zero_shot_classify(model, variables, folder, tok, image_size=32, context_length=16,
                                             templates="subset", batch_size=5)  # 12 = 5 + 5 + 2 (padded)
  # Independent path: one image at a time, logits from the embeddings, accuracy by definition.
  text = class_embeddings(model, variables, folder.classes, tok, 16, "subset")
  logits = []
  for path, _ in folder.items:
    x = classification.preprocess(path, 32)[None]
    embeds = model.apply(variables, x, method=model.encode_image)["image_embeds"]
    logits.append(np.asarray(l2_normalize(embeds) @ text.T)[0])
  labels = [y for _, y in folder.items]
  assert result["top1"] == pytest.approx(_topk_by_definition(np.array(logits), labels, 1))
  assert result["top5"] == pytest.approx(_topk_by_definition(np.array(logits), labels, 5)) == 100.0
  assert result["images"] == 12 and result["classes"] == 4


def test_cli_and_bad_folders(tiny, tmp_path):
  config, _, variables = tiny
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_variables(ckpt, variables)
  root = _folder(str(tmp_path / "set"), per_class=1)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "groupvit_jax.evaluate", "--config=configs/tiny.py", f"--checkpoint={ckpt}",
         "--dataset=classification", f"--data_dir={root}", f"--output_dir={out}"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "zero-shot classification: top-1" in res.stdout
  assert json.load(open(out / "metrics.json"))["images"] == 4
  with pytest.raises(FileNotFoundError, match="classification folder .* does not exist"):
    classification.load_folder(str(tmp_path / "nowhere"))
  with open(os.path.join(root, "classnames.txt"), "w") as f:
    f.write("circle\nsquare\n")
  with pytest.raises(ValueError, match=r"classnames.txt: 2 names for 4 class folders"):
    classification.load_folder(root)
  empty = tmp_path / "empty" / "a"
  empty.mkdir(parents=True)
  with pytest.raises(ValueError, match="no images in the class folders"):
    classification.load_folder(str(tmp_path / "empty"))
