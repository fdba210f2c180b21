"""Experiment configs are data that load from anywhere: by file path from any directory, and by name after
`pip install` (configs/ installs as dyngen.configs); no generic top-level package is installed."""
import pathlib
import subprocess
import sys
import textwrap

import pytest

from dyngen import configs
from dyngen.train import config_checks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.stem for path in (REPO_ROOT / "configs").glob("*.py") if not path.stem.startswith("_"))


def run_python(code, cwd):
  """`code` in a fresh interpreter started in `cwd`, isolated (-I: no PYTHONPATH, cwd not on sys.path)."""
  result = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_config_files_load_by_absolute_path_from_another_directory(tmp_path):
  # ml_collections' config flag, as dyngen.main defines it, in a directory without configs/ or dyngen/:
  # the files import only dyngen and ml_collections (dydig_quickstart imports two other configs).
  out = run_python(f"""
      from absl import flags
      from ml_collections import config_flags
      names = {SHIPPED!r}
      holders = [config_flags.DEFINE_config_file(name) for name in names]
      flags.FLAGS(["prog"] + [f"--{{name}}={REPO_ROOT}/configs/{{name}}.py:runlocal" for name in names])
      for name, holder in zip(names, holders):
        print(name, holder.value.model.name, holder.value.num_train_steps)
      """, tmp_path)
  loaded = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
  assert sorted(loaded) == SHIPPED
  assert loaded["dydig_quickstart"][0] == "dydig" and loaded["dit_xl"] == ["dit", "20"]


def test_configs_by_name_and_variant_in_a_fresh_process_elsewhere(tmp_path):
  out = run_python("""
      import importlib.util
      import dyngen.configs
      config = dyngen.configs.get("dit_xl", "XL/4")
      print(config.model.hidden_size, config.model.patch_size, config.model.depth)
      print(dyngen.configs.names() == sorted(dyngen.configs.names()), len(dyngen.configs.names()))
      # Installed under dyngen only: no top-level `configs` or `pallas_kernels` to collide with.
      print(importlib.util.find_spec("configs"), importlib.util.find_spec("pallas_kernels"))
      from dyngen.pallas_kernels import gla
      print(gla.__name__)
      """, tmp_path)
  assert out.splitlines() == ["1152 4 28", f"True {len(SHIPPED)}", "None None", "dyngen.pallas_kernels.gla"]
  # The command-line helper prints the file, for --config=<file>:<arg>.
  result = subprocess.run([sys.executable, "-I", "-m", "dyngen.configs", "dit_xl"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
  assert pathlib.Path(result.stdout.strip()).read_text() == (REPO_ROOT / "configs" / "dit_xl.py").read_text()


def test_get_equals_the_file_and_names_the_missing_ones():
  assert configs.names() == SHIPPED
  namespace = {}
  source = REPO_ROOT / "configs" / "dig_xl.py"
  exec(compile(source.read_text(), str(source), "exec"), namespace)  # pylint: disable=exec-used
  assert configs.get("dig_xl", "XL/2,runlocal").to_dict() == namespace["get_config"]("XL/2,runlocal").to_dict()
  with pytest.raises(ValueError, match=r"no experiment config named 'dit_xxl'; dyngen ships \["):
    configs.get("dit_xxl")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_the_checks(name):
  config = configs.get(name)
  if config.data.name == "latents":  # The ImageNet configs need the user's latents and VAE (docs/imagenet.md).
    config.data.latent_dir, config.latent.vae = "LATENTS", "sd-vae-ft-ema"
  config_checks.check_config(config, num_devices=1)
