"""launch/colab.ipynb executed headless (nbclient) on a tiny quickstart checkpoint and the official dit_tiny
file, as a Colab user runs it: the parameter cell's values replaced, nothing else."""
import base64
import io
import json
import pathlib

import jax.numpy as jnp
import nbclient  # nbclient, nbformat and ipykernel come with the `test` extra (setup.py).
import nbformat
import numpy as np
import PIL.Image
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "launch" / "colab.ipynb"
OFFICIAL = REPO_ROOT / "tests" / "data" / "dit_tiny"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  from dyngen import configs  # pylint: disable=g-import-not-at-top
  from dyngen import models  # pylint: disable=g-import-not-at-top
  from dyngen.bench import measure  # pylint: disable=g-import-not-at-top

  tmp_path = tmp_path_factory.mktemp("colab")
  # The quickstart's config (cosine schedule, 1 channel, 10 classes, clipped x_0) on a 1-block model.
  config = configs.get("quickstart")
  config.model.update(dict(hidden_size=32, depth=1, num_heads=2))
  config.sample.num_steps = 10
  model = models.build(config.model)
  example = (jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  params = measure.random_params(model, *example, scale=0.1)
  workdir = tmp_path / "quickstart"
  checkpoint.save_inference_checkpoint(workdir / checkpoint.CHECKPOINT_SUBDIR, config, params, step=3000)

  manifest = json.loads((OFFICIAL / "manifest.json").read_text())
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
  overrides = dict(INSTALL=False, CHECKPOINT=str(workdir), NUM_IMAGES=12,
                   OFFICIAL_CHECKPOINT=str(OFFICIAL / "checkpoint.pt"), OFFICIAL_CONFIG="dit_xl",
                   OFFICIAL_VARIANT="XL/2", OFFICIAL_MODEL_OVERRIDES=manifest["constructor_kwargs"],
                   CONVERTED=str(tmp_path / "converted"))
  parameters.source += "\n# The test's values.\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  # What the test reads back from the kernel, after the notebook's own cells.
  notebook.cells.append(nbformat.v4.new_code_cell(
      "import json\n"
      "print('RESULT', json.dumps(dict(grid=list(grid.shape), images=images.tolist(), labels=labels.tolist(),"
      " converted=[converted_config.model.hidden_size, converted_config.model.depth])))"))
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  return notebook, config, params, tmp_path


def outputs(cell):
  return [output for output in cell.get("outputs", []) if output.output_type in ("stream", "display_data")]


def test_every_cell_ran_without_errors(executed):
  notebook, _, _, tmp_path = executed
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
  assert (tmp_path / "converted" / "0").is_dir()


def test_the_grid_is_the_checkpoints_guided_samples(executed):
  notebook, config, params, _ = executed
  text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in outputs(cell))
  # The checkpoint's own settings: its schedule and sampling steps, not the defaults.
  assert "squaredcos_cap_v2" in text and "samples with ddpm 10 steps, guidance 2.0" in text
  result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
  images = np.asarray(result["images"], np.uint8)
  assert images.shape == (12, 8, 8, 1) and result["labels"] == [i % 10 for i in range(12)]
  # An independent sampler of the same checkpoint in this process, at the config's grid guidance scale.
  from dyngen.train import sample as sample_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.sample.batch_size = 12
  expected = sample_lib.notebook_sampler(config).generate(params, np.asarray(result["labels"]),
                                                          cfg_scale=config.sample.grid_cfg_scale, seed=0)
  np.testing.assert_array_equal(images, expected)
  # The picture shown is that grid, enlarged.
  pictures = [o for cell in notebook.cells if cell.cell_type == "code" for o in outputs(cell)
              if "image/png" in o.get("data", {})]
  assert pictures
  shown = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(pictures[0]["data"]["image/png"]))))
  grid = sample_lib.image_grid(expected, columns=8)[..., 0]
  scale = shown.shape[0] // grid.shape[0]
  np.testing.assert_array_equal(shown, np.repeat(np.repeat(grid, scale, 0), scale, 1))


def test_the_official_checkpoint_converts_and_loads(executed):
  notebook, _, _, _ = executed
  text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in outputs(cell))
  manifest = json.loads((OFFICIAL / "manifest.json").read_text())
  result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
  assert result["converted"] == [manifest["constructor_kwargs"]["hidden_size"], manifest["constructor_kwargs"]["depth"]]
  assert "checkpoint.pt -> " in text
