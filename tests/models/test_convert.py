"""Weight conversion: round trips, the CLI on real files, and the errors bad files get."""

import os
import pickle
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from groupvit_jax import checkpoint, config_lib, models
from groupvit_jax.models import convert
from tests.models import hf_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.load_config("configs/tiny.py")
  hf = hf_reference.random_hf_model(config.model, seed=3)
  sd = hf_reference.state_dict_numpy(hf)
  variables = convert.import_state_dict(sd, models.variables_template(config.model))
  return config, hf, sd, variables


def _assert_same_tree(a, b):
  fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_export_import_round_trips_are_the_identity(tiny):
  config, _, _, variables = tiny
  template = models.variables_template(config.model)
  _assert_same_tree(convert.import_state_dict(convert.export_hf(variables), template, "hf"), variables)
  _assert_same_tree(convert.import_state_dict(convert.variables_to_nvlabs(variables), template, "nvlabs"),
                    variables)


def test_exported_state_dict_loads_strictly_into_hf(tiny):
  config, hf, sd, variables = tiny
  exported = convert.export_hf(variables)
  fresh = hf_reference.GroupViTModel(hf_reference.hf_config(config.model))
  missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
  assert not unexpected
  assert all(k.endswith("num_batches_tracked") for k in missing), missing
  for k, v in exported.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_cli_imports_a_pth_and_exports_safetensors(tiny, tmp_path):
  config, _, sd, variables = tiny
  nvlabs = hf_reference.hf_to_nvlabs_reference(sd)
  pth = tmp_path / "group_vit.pth"
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in nvlabs.items()}, "epoch": 3}, pth)
  out_dir = tmp_path / "ckpt"
  cmd = [sys.executable, "-m", "groupvit_jax.models.convert", "--config=configs/tiny.py", f"--input={pth}",
         f"--output={out_dir}"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "nvlabs format" in res.stdout
  restored = checkpoint.load_variables(str(out_dir), models.variables_template(config.model))
  _assert_same_tree(jax.device_get(restored), variables)

  st = tmp_path / "hf.safetensors"
  cmd = [sys.executable, "-m", "groupvit_jax.models.convert", "--config=configs/tiny.py",
         f"--checkpoint={out_dir}", f"--export_hf={st}"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  reloaded = convert.load_state_dict(str(st))
  for k, v in reloaded.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_not_a_groupvit_checkpoint(tmp_path, tiny):
  config = tiny[0]
  path = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, path)
  with pytest.raises(ValueError, match=r"not a GroupViT checkpoint.*conv1\.weight"):
    convert.import_state_dict(convert.load_state_dict(str(path)), models.variables_template(config.model))


def test_shape_mismatch_names_the_first_parameter(tiny):
  config, _, sd, _ = tiny
  wider = config_lib.load_config("configs/tiny.py")
  wider.model.text.width = 64
  with pytest.raises(ValueError, match=r"parameter 'text_encoder\.[a-z_.0-9]+': checkpoint shape .* does not fit"):
    convert.import_state_dict(sd, models.variables_template(wider.model))


def test_missing_and_unexpected_parameters_are_named(tiny):
  config, _, sd, _ = tiny
  partial = {k: v for k, v in sd.items() if "final_layer_norm" not in k}
  with pytest.raises(ValueError, match=r"no parameter 'text_encoder\.ln_final\.(weight|bias)'"):
    convert.import_state_dict(partial, models.variables_template(config.model))
  deeper = config_lib.load_config("configs/tiny.py")
  deeper.model.text.layers = 1
  with pytest.raises(ValueError, match=r"'text_encoder\.transformer\.resblocks\.1\..*' has no place"):
    convert.import_state_dict(sd, models.variables_template(deeper.model))


def test_pickles_that_run_code_are_refused(tmp_path):
  class Payload:

    def __reduce__(self):
      return (os.system, ("echo pwned > /dev/null",))

  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"model": Payload()}, f)
  with pytest.raises(ValueError, match="evil.pth: not a readable PyTorch checkpoint"):
    convert.load_state_dict(str(path))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.pth"):
    convert.load_state_dict(str(tmp_path / "nothere.pth"))
  with pytest.raises(FileNotFoundError, match="no_ckpt"):
    checkpoint.load_variables(str(tmp_path / "no_ckpt"))


def test_pos_embed_of_another_grid_is_resized_on_import(tiny):
  config, _, sd, variables = tiny
  bigger = config_lib.load_config("configs/tiny.py")
  bigger.model.image.image_size = 48  # 12x12 grid instead of 8x8
  imported = convert.import_state_dict(sd, models.variables_template(bigger.model))
  assert imported["params"]["img_encoder"]["pos_embed"].shape == (1, 144, 32)
