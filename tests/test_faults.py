"""Faults a user meets: the README's training commands as written, one-line errors with exit status 2,
a damaged checkpoint, a cut tar, and a quiet training run. Every damaged input is built here."""

import glob
import io
import json
import os
import re
import shlex
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

from groupvit_jax import checkpoint, config_lib
from groupvit_jax.datasets import webdataset_to_tfrecord
from groupvit_jax.models import build_model, random_variables
from tests.subprocess_util import run, tail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TIMEOUT = 900  # a 40-step tiny run takes ~60 s on 2 quiet cores
CLI_TIMEOUT = 300  # start-up and an error: ~10 s


def _cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT):
  return run([sys.executable, "-m", module, *args], timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def _assert_one_line_error(result, pattern: str) -> None:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  shown = f"exit {result.returncode}; stderr:\n{tail(result.stderr)}\nstdout:\n{tail(result.stdout)}"
  assert result.returncode == 2, shown
  assert len(lines) == 1 and lines[0].startswith("error: "), shown
  assert re.search(pattern, lines[0]), shown
  assert "Traceback" not in result.stdout + result.stderr, shown


def _jpeg(rng, size=32) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.randint(0, 255, (size, size, 3), np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def _write_tar(path: str, samples: list[tuple[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _captioned_tar(path: str, n: int, seed: int = 0) -> None:
  rng = np.random.RandomState(seed)
  samples = []
  for i in range(n):
    samples += [(f"{i:04d}.jpg", _jpeg(rng)), (f"{i:04d}.txt", f"a red circle and a blue square {i}".encode())]
  _write_tar(path, samples)


# ---------------------------------------------------------------------------------------------------
# The README's training commands, verbatim but for tiny sizes and local paths.
# ---------------------------------------------------------------------------------------------------


def readme_train_commands() -> list[list[str]]:
  """The commands of the README's `## Train` block, continuation lines joined, comments dropped."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  block = re.search(r"## Train\n+```bash\n(.*?)```", text, re.S).group(1)
  joined = re.sub(r"\\\n\s*", " ", block)
  commands = []
  for line in joined.splitlines():
    line = re.sub(r"\s+#.*$", "", line).strip()
    if line:
      commands.append(shlex.split(line))
  return commands


@pytest.fixture(scope="module")
def readme_runs(shapes_data_dir, tmp_path_factory):
  """Runs each README training command; returns [(argv, workdir, result)]."""
  root = tmp_path_factory.mktemp("readme")
  shards = root / "shards"
  _captioned_tar(str(root / "000.tar"), 40)
  webdataset_to_tfrecord.convert([str(root / "000.tar")], str(shards), examples_per_shard=20)
  runs = []
  for i, argv in enumerate(readme_train_commands()):
    workdir = str(root / f"run{i}")
    swapped = []
    for arg in argv:
      arg = arg.replace("/tmp/gvj_tiny", workdir).replace("gs://BUCKET/runs/groupvit_s", workdir)
      arg = arg.replace("gs://BUCKET/cc12m/*.tfrecord", str(shards / "*.tfrecord"))
      swapped.append(arg.replace("configs/groupvit_s.py", "configs/tiny.py"))
    assert swapped[:3] == ["python", "-m", "groupvit_jax.train"], argv
    # Tiny sizes: 40 steps for the commands that set a step count of their own, else 4.
    steps = 40 if any(a.startswith("--config.total_steps") for a in argv) else 4
    cmd = [sys.executable] + swapped[1:] + [f"--config.total_steps={steps}"]
    result = run(cmd, timeout=TRAIN_TIMEOUT, cwd=REPO, env={**os.environ, "GROUPVIT_JAX_DATA": shapes_data_dir})
    runs.append((argv, workdir, steps, result))
  return runs


def _metrics_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if '"loss"' in line]


def test_readme_training_commands_run(readme_runs):
  assert len(readme_runs) == 3
  for argv, workdir, steps, result in readme_runs:
    assert result.returncode == 0, f"{' '.join(argv)}\n{tail(result.stderr)}"
    assert f"step {steps}/{steps}" in result.stdout, tail(result.stdout)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))


def test_a_training_run_prints_progress_and_results_only(readme_runs):
  argv, _, steps, result = next(r for r in readme_runs if r[2] == 40)
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 40, "\n".join(lines)
  assert sum(line.startswith("step ") for line in lines) == steps // 5  # tiny.py logs every 5 steps


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(readme_runs, shapes_data_dir, tmp_path):
  argv, workdir, _, _ = next(r for r in readme_runs if r[2] == 40)
  work = str(tmp_path / "work")
  shutil.copytree(workdir, work)
  # Cut the latest checkpoint's largest file in half.
  files = [p for p in glob.glob(os.path.join(work, "checkpoints", "40", "**"), recursive=True) if os.path.isfile(p)]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  evaluated = _cli("groupvit_jax.evaluate", "--config=configs/tiny.py", f"--checkpoint={work}",
                   f"--data_dir={_voc(tmp_path / 'voc')}", f"--output_dir={tmp_path / 'eval'}", "--mode=whole")
  _assert_one_line_error(evaluated, r"not a readable checkpoint: .*/checkpoints/40/state \(")
  resumed = run([sys.executable, "-m", "groupvit_jax.train", "--config=configs/tiny.py", f"--workdir={work}",
                 "--config.total_steps=50"], timeout=TRAIN_TIMEOUT, cwd=REPO,
                env={**os.environ, "GROUPVIT_JAX_DATA": shapes_data_dir})
  assert resumed.returncode == 0, tail(resumed.stderr)
  assert re.search(r"checkpoints/40 is not readable .*moved to .*40\.damaged", resumed.stderr), tail(resumed.stderr)
  assert "resumed from step 30" in resumed.stdout, tail(resumed.stdout)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["30", "40", "40.damaged", "50"]
  assert _metrics_steps(work) == list(range(5, 55, 5))  # each step once, the damaged run's rows replaced
  # A readable checkpoint of another model is not damage: one line, nothing moved.
  other = run([sys.executable, "-m", "groupvit_jax.train", "--config=configs/tiny.py", f"--workdir={work}",
               "--config.total_steps=60", "--config.model.text.width=64"], timeout=TRAIN_TIMEOUT, cwd=REPO,
              env={**os.environ, "GROUPVIT_JAX_DATA": shapes_data_dir})
  _assert_one_line_error(other, r"checkpoint .*/checkpoints/50 does not match this config's train state")
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["30", "40", "40.damaged", "50"]


# ---------------------------------------------------------------------------------------------------
# One-line errors.
# ---------------------------------------------------------------------------------------------------


def _voc(root, n: int = 2, damage: str = "") -> str:
  """A VOC-layout folder of n 32-px images; `damage` spoils it: bad_id, size, truncated_jpeg, empty."""
  rng = np.random.RandomState(0)
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  names = [f"img{i}" for i in range(n)]
  for name in names:
    data = _jpeg(rng)
    if damage == "truncated_jpeg" and name == names[-1]:
      data = data[:len(data) // 2]
    with open(os.path.join(root, "JPEGImages", name + ".jpg"), "wb") as f:
      f.write(data)
    mask = rng.randint(0, 21, (16, 32) if damage == "size" else (32, 32)).astype(np.uint8)
    if damage == "bad_id":
      mask[0, 0] = 30
    Image.fromarray(mask).save(os.path.join(root, "SegmentationClass", name + ".png"))
  with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
    f.write("" if damage == "empty" else "\n".join(names) + "\n")
  return str(root)


@pytest.fixture(scope="module")
def tiny_variables(tmp_path_factory):
  """A converted (variables) checkpoint of configs/tiny.py's model, random weights."""
  path = str(tmp_path_factory.mktemp("variables") / "tiny")
  config = config_lib.load_config("configs/tiny.py")
  variables = random_variables(build_model(config.model), config.model, __import__("jax").random.key(0))
  checkpoint.save_variables(path, {"params": variables["params"], "batch_stats": variables["batch_stats"]})
  return path


def _evaluate(checkpoint_path, data_dir, tmp_path, config="configs/tiny.py"):
  return _cli("groupvit_jax.evaluate", f"--config={config}", f"--checkpoint={checkpoint_path}",
              f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'eval'}", "--mode=whole", "--short_side=32")


def test_train_with_a_missing_config_file(tmp_path):
  result = _cli("groupvit_jax.train", "--config=configs/nonexistent.py", f"--workdir={tmp_path / 'w'}")
  _assert_one_line_error(result, r"--config: configs/nonexistent\.py: no such config file")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("data, message", [
    ('[{"kind": "tfrecord", "patterns": ["/nonexistent/*.tfrecord"]}]', r"no files match '/nonexistent/\*\.tfrecord'"),
    ('[{"kind": "parquet", "patterns": ["x"]}]', r"unknown data source kind 'parquet'"),
    ('[{"kind": "tfrecord"', r"input.data_json"),
])
def test_train_with_bad_data_sources(data, message, tmp_path):
  result = _cli("groupvit_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                f"--config.input.data_json={data}")
  _assert_one_line_error(result, message)


def test_evaluate_a_missing_checkpoint(tmp_path):
  _assert_one_line_error(_evaluate(tmp_path / "nothing", _voc(tmp_path / "voc"), tmp_path),
                         r"checkpoint .*/nothing: no such directory")


def test_evaluate_with_the_wrong_config_names_the_parameter(tiny_variables, tmp_path):
  result = _evaluate(tiny_variables, _voc(tmp_path / "voc"), tmp_path, config="configs/demo.py")
  _assert_one_line_error(result, r"does not fit the config: params/\S+ is \(\d+.*\) in the checkpoint, \(\d+.*\) "
                                 r"in the config")


@pytest.mark.parametrize("damage, message", [
    ("bad_id", r"img\d\.png: class id 30 >= the 21 classes"),
    ("size", r"img\d\.png: mask size \(32, 16\) differs from image size \(32, 32\)"),
    ("truncated_jpeg", r"img1\.jpg: not a readable image"),
    ("empty", r"val\.txt: the split is empty"),
])
def test_evaluate_bad_datasets(damage, message, tiny_variables, tmp_path):
  _assert_one_line_error(_evaluate(tiny_variables, _voc(tmp_path / "voc", damage=damage), tmp_path), message)


def test_segment_errors(tiny_variables, tmp_path):
  _assert_one_line_error(_cli("groupvit_jax.segment", "--config=configs/tiny.py"),
                         r"flag --checkpoint=None: Flag --checkpoint must have a value")
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image")
  _assert_one_line_error(_cli("groupvit_jax.segment", "--config=configs/tiny.py", f"--checkpoint={tiny_variables}",
                              f"--image={garbage}", "--classes=circle"), r"garbage\.jpg: not a readable image")


def test_converter_errors(tmp_path):
  _assert_one_line_error(_cli("groupvit_jax.datasets.webdataset_to_tfrecord", f"--input={tmp_path}/*.tar",
                              f"--output_dir={tmp_path / 'out'}"), r"no files match")
  _assert_one_line_error(_cli("groupvit_jax.models.convert", "--config=configs/tiny.py",
                              f"--input={tmp_path / 'missing.pth'}", f"--output={tmp_path / 'out'}"),
                         r"missing\.pth")


def test_debug_shows_the_traceback(tmp_path):
  result = _cli("groupvit_jax.evaluate", "--config=configs/tiny.py", f"--checkpoint={tmp_path}",
                f"--data_dir={tmp_path / 'no_voc'}", f"--output_dir={tmp_path / 'eval'}", "--debug")
  assert result.returncode != 0 and "Traceback" in result.stderr, tail(result.stderr)


# ---------------------------------------------------------------------------------------------------
# A cut tar in the converter.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("into", [0, 100, 512 + 5])  # at, into the caption's header; into its data
def test_converter_keeps_the_samples_before_a_cut_and_reports_the_rest(into, tmp_path):
  _captioned_tar(str(tmp_path / "a.tar"), 6)
  _captioned_tar(str(tmp_path / "b.tar"), 3, seed=1)
  data = (tmp_path / "a.tar").read_bytes()
  # Cut a.tar inside sample 0004's caption: samples 0000-0003 complete, 0004 has its image only.
  offsets = []
  with tarfile.open(tmp_path / "a.tar") as tar:
    for member in tar:
      offsets.append((member.name, member.offset))
  cut = dict(offsets)["0004.txt"] + into
  (tmp_path / "a.tar").write_bytes(data[:cut])
  out = str(tmp_path / "out")
  result = _cli("groupvit_jax.datasets.webdataset_to_tfrecord", f"--input={tmp_path}/*.tar", f"--output_dir={out}")
  assert result.returncode == 0, tail(result.stderr)
  assert re.search(r"a\.tar: truncated or corrupt after sample '0004'", result.stderr), result.stderr
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["written"] == 4 + 3 and report["skipped"] == 1
  assert [(os.path.basename(s["tar"]), s["key"]) for s in report["skipped_samples"]] == [("a.tar", "0004")]
  assert "no caption" in report["skipped_samples"][0]["reason"]
  assert [(os.path.basename(d["tar"]), d["after_key"]) for d in report["damaged_tars"]] == [("a.tar", "0004")]
  assert not glob.glob(os.path.join(out, "*.tmp"))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keys = [tf.train.Example.FromString(r.numpy()).features.feature["key"].bytes_list.value[0].decode()
          for r in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(out, "*.tfrecord"))))]
  assert keys == ["0000", "0001", "0002", "0003", "0000", "0001", "0002"]


def test_launch_errors():
  env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "TPU_ZONE")}
  result = run([sys.executable, "-m", "launch.tpu_vm", "create"], timeout=CLI_TIMEOUT, cwd=REPO, env=env)
  _assert_one_line_error(result, r"tpu_vm\.py: --name and --zone are required")
  _assert_one_line_error(_cli("launch.sweep"), r"sweep\.py: the following arguments are required: --sweep")
