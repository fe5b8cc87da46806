"""The page (groupvit_jax.app): served on localhost and driven in headless Chromium, its overlay checked
pixel by pixel against the evaluator's prediction for the same image; and its logic without the page:
the image tower's output reused across class names, one-line messages for bad input, a checkpoint that
does not fit refused while the old one keeps serving."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from groupvit_jax import app, checkpoint, config_lib, demo, viz
from groupvit_jax.datasets import shapes, shapes_tfds
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter
from groupvit_jax.models import build_model, random_variables
from groupvit_jax.pp import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CLASSES = ", ".join(shapes.CLASSES)
# The browser test's screenshot is also saved where this names (docs/app.png), and the checkpoint of the
# demo's model it serves is random unless this names a trained one (a `make demo` workdir).
SCREENSHOT_ENV = "GROUPVIT_JAX_APP_SCREENSHOT"
CHECKPOINT_ENV = "GROUPVIT_JAX_APP_CHECKPOINT"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
  """The demo's model (configs/demo.py) with random weights, saved as a converted checkpoint; two held-out
  shapes images of its world."""
  config = config_lib.load_config("configs/demo.py")
  model = build_model(config.model)
  root = tmp_path_factory.mktemp("app")
  ckpt = str(root / "ckpt")
  checkpoint.save_variables(ckpt, random_variables(model, config.model, jax.random.key(0)))
  trained = os.environ.get(CHECKPOINT_ENV)
  heldout = shapes.write_voc_layout(str(root / "heldout"), 2, seed=shapes_tfds.SPLIT_SEEDS["validation"],
                                    image_size=32, world="coded")
  images = [os.path.join(heldout, "JPEGImages", n) for n in sorted(os.listdir(os.path.join(heldout, "JPEGImages")))]
  return config, ckpt, trained or ckpt, images


def _evaluator_prediction(config, ckpt, image_path, bg_threshold):
  """The label map the demo's held-out evaluation gives the image (its geometry, its segmenter)."""
  model = build_model(config.model)
  variables = checkpoint.load_model_variables(ckpt, config.model)
  ev = demo.heldout_evaluator(config, "", bg_threshold)
  segmenter = ZeroShotSegmenter(model, variables, list(shapes.CLASSES), tokenizers.get_tokenizer(config.input.tokenizer),
                                patch_size=config.model.image.patch_size, context_length=config.input.context_length,
                                bg_threshold=bg_threshold, mode=ev["mode"], crop=ev["crop"], stride=ev["stride"],
                                short_side=ev["short_side"], long_side=ev["long_side"])
  image = np.asarray(Image.open(image_path).convert("RGB"))
  return image, segmenter.predict(image)


def _expected_overlay(image, pred):
  """The overlay by its definition: each labelled pixel half image, half its class colour (background
  pixels untouched), enlarged by an integer factor to at least 256 px."""
  colors = viz.palette(len(shapes.CLASSES) + 1)
  out = image.astype(np.float32)
  fg = pred != 0
  out[fg] = 0.5 * out[fg] + 0.5 * colors[pred[fg]].astype(np.float32)
  k = -(-256 // image.shape[0])
  return np.kron(out.astype(np.uint8), np.ones((k, k, 1), np.uint8))


def test_segmenter_reuses_the_image_tower_and_says_what_is_wrong(demo_model, tmp_path):
  config, ckpt, _, images = demo_model
  seg = app.Segmenter(config, ckpt)
  first = seg(images[0], CLASSES, 0.95, "whole")
  calls = []
  seg.segmenter(tuple(reversed(shapes.CLASSES)), None, "whole")._features = (  # pylint: disable=protected-access
      lambda *a: calls.append(a))
  reordered = seg(images[0], ", ".join(reversed(shapes.CLASSES)), 0.0, "whole")
  assert not calls and len(seg._features) == 1  # pylint: disable=protected-access
  # The reused features give what a segmenter that encodes the image itself gives.
  image, pred = _evaluator_prediction(config, ckpt, images[0], None)
  names = list(reversed(shapes.CLASSES))
  remap = np.asarray([names.index(c) for c in shapes.CLASSES])
  big = viz.enlarge(image, app.DISPLAY_SIZE)
  got = reordered.overlay[:big.shape[0], :big.shape[1]]
  colors = viz.palette(len(names) + 1)
  want = (0.5 * big.astype(np.float32) + 0.5 * colors[viz.enlarge(remap[pred] + 1, app.DISPLAY_SIZE)]).astype(np.uint8)
  np.testing.assert_array_equal(got, want)
  assert first.table and all(0 < row[1] <= 100 for row in first.table)
  assert abs(sum(row[1] for row in first.table) - 100) < 0.5  # every pixel of the window in one group
  assert first.groups.shape[0] == big.shape[0]
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  for args, says in [((str(bad), CLASSES, 0.95, "whole"), "broken.png is not a readable image"),
                     ((images[0], " , ,", 0.95, "whole"), "classes: expected at least one class name"),
                     ((None, CLASSES, 0.95, "whole"), "image: none given")]:
    with pytest.raises(app.PageError, match=says):
      seg(*args)
  page = app.Page(seg, "configs/demo.py", CLASSES)
  message = page.load("configs/tiny.py", ckpt)
  assert message.startswith("**Error:** checkpoint") and "does not fit the config" in message, message
  assert "still serving" in message and page.segmenter is seg
  assert page.load("", ckpt).startswith("**Error:** checkpoint") and page.segmenter is seg  # no config.json


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _browser(tmp_path):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  for path in (CHROMIUM, CHROMEDRIVER):
    assert os.path.exists(path), f"{path} missing: `make test` installs Debian's chromium and chromium-driver"
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'chromium'}"):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(condition, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    value = condition()
    if value:
      return value
    time.sleep(0.5)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_page_in_a_browser_matches_the_evaluator(demo_model, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  config, _, ckpt, images = demo_model
  port = _free_port()
  log = open(tmp_path / "server.log", "w")
  env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  start = time.time()
  server = subprocess.Popen([sys.executable, "-m", "groupvit_jax.app", "--config=configs/demo.py",
                             f"--checkpoint={ckpt}", f"--port={port}"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  driver = None
  try:
    url = f"http://127.0.0.1:{port}/"

    def up():
      assert server.poll() is None, open(tmp_path / "server.log").read()[-3000:]
      try:
        return urllib.request.urlopen(url, timeout=5).status == 200
      except OSError:
        return False

    _wait(up, 600, "the server")
    driver = _browser(tmp_path)
    driver.get(url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), 120, "the page")

    def ask(path):
      for clear in driver.find_elements(By.CSS_SELECTOR, "#image button[aria-label=Clear]"):
        clear.click()  # the file field holds one file: empty it first
      upload = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), 60, "the file field")
      upload[0].send_keys(path)
      stem = os.path.splitext(os.path.basename(path))[0]
      _wait(lambda: stem in driver.find_element(By.ID, "image").text, 60, f"the upload of {stem}")
      driver.find_element(By.ID, "segment").click()
      name = os.path.basename(path)  # every answer names the image it is about (error or not)

      def answered():
        text = driver.find_element(By.ID, "status").text
        return text if name in text and text.endswith(".") else ""

      return _wait(answered, 300, f"the answer for {name}")

    box = driver.find_element(By.CSS_SELECTOR, "#classes textarea")
    box.clear()
    box.send_keys(CLASSES)
    status = ask(images[1])
    first_answer = time.time() - start
    assert f"Segmented {os.path.basename(images[1])} (32x32 px) into 8 classes" in status, status
    src = driver.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src")
    overlay = np.asarray(Image.open(urllib.request.urlopen(src, timeout=30)).convert("RGB"))
    image, pred = _evaluator_prediction(config, ckpt, images[1], 0.95)
    assert len(np.unique(pred)) >= 2, "a prediction of one label would check little"
    want = _expected_overlay(image, pred)
    np.testing.assert_array_equal(overlay[:want.shape[0], :want.shape[1]], want)
    assert driver.find_elements(By.CSS_SELECTOR, "#groups img") and "hexagon" in driver.find_element(By.ID, "table").text
    driver.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get(SCREENSHOT_ENV):
      shutil.copy(tmp_path / "page.png", os.environ[SCREENSHOT_ENV])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "broken.png is not a readable image" in ask(str(bad))
    assert "Segmented" in ask(images[0])  # still serving
    print(f"start-up to first answer: {first_answer:.1f} s")
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    server.wait(timeout=60)
    log.close()
