"""docs/config_reference.md: current with configs/, and saying what the configs say.

The reference is generated (`python -m dyngen.config_reference`); the first test is the CI check that it was
regenerated after a config changed. The others compare it with the configs read independently (ml_collections'
own `to_dict` walk, and the comment text read from the config source with a regular expression).
"""
import pathlib
import re
import subprocess
import sys

import pytest

from dyngen import config_reference

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "docs" / "config_reference.md"


@pytest.fixture(scope="module")
def rendered():
  return config_reference.render()


def test_checked_in_reference_is_current(rendered):
  assert REFERENCE.exists(), "docs/config_reference.md is missing: run `python -m dyngen.config_reference`"
  assert REFERENCE.read_text() == rendered, (
      "docs/config_reference.md is stale (a config changed since it was generated): run "
      "`python -m dyngen.config_reference` from the repository root and commit docs/config_reference.md")


def flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and not ("model" in value and "optimizer" in value):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def table_rows(text, heading):
  """{field: [cells]} of the markdown table under `heading`."""
  section = text.split(heading, 1)[1].split("\n#", 1)[0]
  rows = {}
  for line in section.splitlines():
    cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
    if cells and cells[0].startswith("`"):
      rows[cells[0].strip("`")] = cells
  return rows


def test_every_field_of_every_config_is_listed_with_its_type(rendered):
  every = table_rows(rendered, "## Every field")
  for name, module in config_reference.config_modules().items():
    fields = flat(module.get_config().to_dict())
    assert fields, name
    for path, value in fields.items():
      assert path in every, f"{name}: {path} is not in the reference"
      kind = every[path][1]
      if isinstance(value, (bool, int, float, str)):
        assert type(value).__name__ in kind, (path, kind)
  assert every["batch_size"][1:4] == ["int", "`256`", str(len(config_reference.config_modules()))]


def test_a_configs_own_values_and_comments(rendered):
  quickstart = table_rows(rendered, "### `configs/quickstart.py`")
  from dyngen.configs import quickstart as quickstart_config  # pylint: disable=g-import-not-at-top
  config = quickstart_config.get_config()
  assert quickstart["sample.num_steps"][1] == f"`{config.sample.num_steps!r}`"
  assert quickstart["diffusion.noise_schedule"][1] == "`'squaredcos_cap_v2'`"
  assert "sample.eta" not in quickstart  # Its usual value: listed only in the first table.
  # The comment beside the field in dyngen/recipes/common.py, read here with a regular expression.
  source = (REPO_ROOT / "dyngen" / "recipes" / "common.py").read_text()
  comment = re.search(r"^\s*guidance_channels=3,\s*#\s*(.*)$", source, re.MULTILINE).group(1)
  assert table_rows(rendered, "## Every field")["sample.guidance_channels"][4] == comment


def test_check_mode_names_the_command(tmp_path):
  stale = tmp_path / "config_reference.md"
  stale.write_text("old\n")
  result = subprocess.run([sys.executable, "-m", "dyngen.config_reference", "--check", f"--output={stale}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "run `python -m dyngen.config_reference` and commit it" in result.stderr
