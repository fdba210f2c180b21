"""Every documented command and snippet runs as written: README.md, launch/ and the docs.

The fenced blocks are read from the documents when the tests run, so a recipe that changes is tested as it
now reads. Every shell command of every ```bash block has one fate, checked by `test_every_command_has_a_fate`:

- RUN: `python -m dyngen.<cli> ...` runs as a subprocess, its text as written with
  - placeholders filled (the official `.pt` files by tiny ones written here in the official torch layout, with
    random weights; `/tmp/<dir>` by a directory of the test), and
  - overrides appended that make the run tiny (fewer steps, a 1-block model), in `TINY_OVERRIDES`. Appended
    flags come after the documented ones, so they change only the sizes; everything else is the text.
  A documented `--workdir=/tmp/dit_xl_2` that an earlier command wrote (`--output=/tmp/dit_xl_2`) is the same
  directory, so the README's convert-then-sample path runs as a chain.
- CHECKED: `pip install` (the extras it names exist) and the test command itself (pytest-xdist for `-n`, the
  `tests` folder); running them here would reinstall the package or recurse into this suite.
- SKIPPED: `SKIPPED`, keyed by the start of the command, each with its reason (cloud machines, downloads, ImageNet).
- FAILS AS WRITTEN: `FAILS_AS_WRITTEN`, each with the error it stops with and the fix for the document; the tests
  run it and expect that error, so fixing the document turns the test red until the entry is removed.
  A key of either list that matches no command fails the test, so the lists shrink when a document changes.

Every ```bash block and every launch/*.sh also passes `bash -n`, and every ```python block of docs/ compiles.
The README's ```python blocks run in this process on a tiny 1000-class DiT written as the official
`DiT-XL-2-256x256.pt` would be (the names the snippet leaves to the reader, x, t, y, ..., filled by a fixture).
launch/colab.md is run by tests/test_user_errors.py (test_colab_recipe_runs_on_a_quickstart_checkpoint) and
launch/colab.ipynb by tests/test_colab_notebook.py; launch/localhost.sh's commands by tests/test_multiprocess.py.
"""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import host_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SHELL_DOCUMENTS = [README, REPO_ROOT / "launch" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# The start of a command -> why it is not run here.
SKIPPED = {
    "python -m dyngen.main --config=configs/dig_xl.py:XL/2 --workdir=gs://BUCKET":
        "a Cloud TPU pod run on ImageNet latents in a bucket (the ImageNet training path runs in "
        "tests/test_imagenet_end_to_end.py; the pod launcher is launch/tpu_pod.sh)",
    "python -m dyngen.main --config=configs/dit_b.py:B/2 --workdir=DIR":
        "ImageNet latents (DIR, no data here) on 4+ devices; the same mesh, bfloat16 and remat fields train "
        "in tests/test_sharding.py and tests/test_train.py",
    "python -m dyngen.main --config=configs/dydit_quickstart.py":
        "27 min: the dense quickstart then 6,000 DyDiT fine-tuning steps; its stages are the quickstart (run "
        "here) and configs/dydit_quickstart.py's fine-tuning (tests/test_dydit.py)",
    "python -m dyngen.main --config=configs/flow_dydit_quickstart.py":
        "DyDiT fine-tuning on flow matching after a dense flow run (tens of minutes); flow training runs in "
        "tests/test_flow_training.py, the flow quickstart here",
    "python -m dyngen.main --config=configs/sit_xl.py:XL/2 --workdir=DIR":
        "SiT's ImageNet recipe (DIR ...: ImageNet latents); flow training runs in tests/test_flow_training.py",
    "python -m dyngen.main --config=configs/dig_xl.py:XL/2,objective=flow":
        "ImageNet latents; flow training runs in tests/test_flow_training.py",
    "python -m dyngen.main --config=configs/dydit_xl.py:XL/2":
        "ImageNet latents and the official DiT-XL/2 weights (LATENTS, sd-vae-ft-ema: nothing to download "
        "here); the DyDiT recipes are checked in tests/test_dydit.py",
    "tfds build imagenet2012": "needs the ILSVRC2012 tars (manual download)",
    "huggingface-cli download": "a download (no network here)",
    "wget ": "a download (no network here)",
    "bash launch/localhost.sh 2 4": "two processes training together (minutes on 2 cores); tests/test_multiprocess.py "
        "starts exactly the commands this launcher prints in its dry run",
    "python -m dyngen.latent.extract --data=imagenet2012":
        "ImageNet as tfds and the SD-VAE weights; the same CLI runs on a synthetic ImageNet-layout folder "
        "in tests/test_imagenet_end_to_end.py",
    "python -m dyngen.main --config=configs/dit_xl.py:XL/2 --workdir=W":
        "ImageNet latents and the SD-VAE (W, LATENTS); tests/test_imagenet_end_to_end.py runs this CLI",
    "python -m dyngen.main --mode=sample --config=configs/dit_xl.py:XL/2 --workdir=/tmp/dit_xl_2":
        "decodes with the SD-VAE weights (a download); tests/test_imagenet_end_to_end.py samples a latent "
        "checkpoint and decodes it through this CLI, and test_readme_convert_and_sample_commands_run checks that "
        "without the VAE it stops with one message naming --config.latent.vae",
    "python -m dyngen.main --mode=sample --config=configs/dit_xl.py:XL/2 --workdir=W":
        "a workdir trained on ImageNet with the SD-VAE; tests/test_imagenet_end_to_end.py samples and decodes "
        "through this CLI",
    "python -m dyngen.evaluate --samples=W/samples":
        "50K ImageNet samples, ADM's reference batch and pytorch-fid's Inception weights (downloads); "
        "tests/test_imagenet_end_to_end.py evaluates through this CLI",
    "python -m dyngen.main --config=configs/dit_xl.py --workdir=gs://bucket":
        "a bucket and ImageNet latents (dyngen/main.py's docstring examples are not in a document)",
}
CHECKED_PREFIXES = ("pip install", "python -m pytest")
# Documented commands that fail as written: the start of the command -> (the error it stops with, the fix to
# make in the document). The tests run each one and expect that error, so fixing the document fails here:
# then move the command out of this list (it runs as RUN).
FAILS_AS_WRITTEN = {}

# Appended to a RUN command whose --config (and module) is listed: tiny sizes, same code path.
TINY_TRAINING = ("--config.num_train_steps=4", "--config.batch_size=16", "--config.log_every_steps=2",
                 "--config.checkpoint_every_steps=4", "--config.sample_every_steps=4", "--config.model.depth=1",
                 "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.sample.num_steps=5",
                 "--config.sample.grid_size=10", "--config.sample.batch_size=50",
                 "--config.evaluation.num_samples=100")
TINY_DIT = ("--config.model.input_size=8", "--config.model.hidden_size=32", "--config.model.depth=1",
            "--config.model.num_heads=2")
TINY_DIG = ("--config.model.input_size=8", "--config.model.hidden_size=64", "--config.model.depth=4",
            "--config.model.num_heads=2")
TINY_OVERRIDES = {
    ("dyngen.main", "configs/quickstart.py"): TINY_TRAINING,
    ("dyngen.main", "configs/flow_quickstart.py"): TINY_TRAINING,
    ("dyngen.main", "configs/dit_s.py:S/2,runlocal"): ("--config.num_train_steps=4", "--config.sample_every_steps=4",
                                                      "--config.checkpoint_every_steps=4"),
    ("dyngen.convert", "configs/dit_xl.py:XL/2"): TINY_DIT,
    ("dyngen.convert", "configs/dig_xl.py:XL/2"): TINY_DIG,
    ("dyngen.convert", "configs/dydit_xl.py:XL/2"): TINY_DIT,
}


# Reading the documents.


def fenced_blocks(path, language):
  """[(first line number, text)] of the ```<language> blocks of a markdown file."""
  text = path.read_text()
  return [(text[:match.start()].count("\n") + 2, match.group(1))
          for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def shell_commands(block):
  """The commands of a shell block: continuation lines joined, comments dropped, `a && b` split."""
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    while words:
      cut = words.index("&&") if "&&" in words else len(words)
      commands.append(words[:cut])
      words = words[cut + 1:]
  return [command for command in commands if command]


def documented_commands():
  """[(where, words)] of every shell command in the documents, in order."""
  found = []
  for path in SHELL_DOCUMENTS:
    for line, block in fenced_blocks(path, "bash"):
      found += [(f"{path.relative_to(REPO_ROOT)}:{line}", words) for words in shell_commands(block)]
  return found


def fate(words):
  """("run" | "check" | "skip" | "fails", reason or None) for one command."""
  text = " ".join(words)
  for prefix, (error, fix) in FAILS_AS_WRITTEN.items():
    if text.startswith(prefix):
      return "fails", f"fails as written: it {error}; fix: {fix}"
  for prefix, reason in SKIPPED.items():
    if text.startswith(prefix):
      return "skip", reason
  if text.startswith(CHECKED_PREFIXES):
    return "check", None
  if words[:2] == ["python", "-m"] and words[2].startswith("dyngen."):
    return "run", None
  return None, None


def flag_value(words, name):
  values = [word.split("=", 1)[1] for word in words if word.startswith(f"--{name}=")]
  return values[0] if values else None


def test_every_command_has_a_fate():
  commands = documented_commands()
  assert len(commands) > 10, "the README's command blocks were not found: update this test"
  unplaced = [(where, " ".join(words)) for where, words in commands if fate(words)[0] is None]
  assert not unplaced, f"commands that are neither run, checked nor skipped with a reason: {unplaced}"
  texts = [" ".join(words) for _, words in commands]
  stale = [prefix for prefix in [*SKIPPED, *FAILS_AS_WRITTEN] if not any(text.startswith(prefix) for text in texts)
           and "docstring" not in SKIPPED.get(prefix, "")]
  assert not stale, f"SKIPPED / FAILS_AS_WRITTEN keys that match no documented command (remove them): {stale}"
  run = {(words[2], flag_value(words, "config")) for _, words in commands if fate(words)[0] == "run"}
  assert run <= set(TINY_OVERRIDES), f"no tiny overrides for {run - set(TINY_OVERRIDES)}: add them"
  assert set(TINY_OVERRIDES) <= run, f"TINY_OVERRIDES for commands no document has: {set(TINY_OVERRIDES) - run}"


def test_every_shell_block_and_launcher_parses():
  scripts = [block for path in SHELL_DOCUMENTS for _, block in fenced_blocks(path, "bash")]
  scripts += [path.read_text() for path in sorted((REPO_ROOT / "launch").glob("*.sh"))]
  for script in scripts:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, (result.stderr, script[:500])


def test_docs_python_blocks_compile():
  for path in sorted((REPO_ROOT / "docs").glob("*.md")):
    for line, block in fenced_blocks(path, "python"):
      compile(block, f"{path.relative_to(REPO_ROOT)}:{line}", "exec")


def test_checked_commands_refer_to_what_exists():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  extras = set(metadata.metadata("dyngen").get_all("Provides-Extra") or [])
  for where, words in documented_commands():
    if words[:2] == ["pip", "install"]:
      for requirement in words[2:]:
        if requirement == "-e":
          continue
        match = re.fullmatch(r"\.(?:\[(.*)\])?", requirement)
        assert match, f"{where}: pip installs {requirement!r}, expected the checkout ('.' or '.[extra]')"
        assert set(filter(None, (match.group(1) or "").split(","))) <= extras, (where, requirement, extras)
    elif words[:3] == ["python", "-m", "pytest"]:
      if "-n" in words:
        import xdist  # pylint: disable=g-import-not-at-top,unused-import
      assert (REPO_ROOT / words[-1]).is_dir(), (where, words)


# Tiny official checkpoints.


def write_official_checkpoint(path, model_config, container, seed=0):
  """A .pt file in the official torch layout for `model_config`: N(0, 0.02²) weights, the fixed buffers.

  container: "raw" (a state dict, as DiT's and SiT's released files) or "ema" ({"model", "ema"}, as the DiT
  training script saves and DyDiT / DiG release).
  """
  from dyngen import models  # pylint: disable=g-import-not-at-top
  from dyngen.convert import load  # pylint: disable=g-import-not-at-top
  from tests import test_convert  # pylint: disable=g-import-not-at-top
  model = models.build(model_config).clone(scan_blocks=False)
  rules, buffers = load.family_rules(model_config.name)(model)
  shapes = load.expected_param_shapes(model)
  rng = np.random.default_rng(seed)
  arrays = {rule.source: (0.02 * rng.standard_normal(rule.layout.torch_shape(shapes[rule.path]))).astype(np.float32)
            for rule in rules}
  arrays.update({buffer.source: np.asarray(buffer.expected, np.float32) for buffer in buffers})
  tensors = {}
  for index, (name, data) in enumerate(arrays.items()):
    storage = test_convert.Storage(str(index), data.reshape(-1), "FloatStorage")
    strides = tuple(int(np.prod(data.shape[i + 1:])) for i in range(data.ndim))
    tensors[name] = test_convert.Tensor(storage, 0, data.shape, strides)
  test_convert.write_zip_checkpoint(path, tensors if container == "raw" else {"model": tensors, "ema": tensors})
  return arrays


def tiny_model_config(config_module, variant, overrides):
  """`config_module.get_config(variant).model` with the --config.model.<field>=<value> overrides applied."""
  config = config_module.get_config(variant)
  for flag in overrides:
    field, value = flag[len("--config.model."):].split("=")
    config.model[field] = type(config.model[field])(value)
  return config.model


# Running the README's commands.


def filled_command(words, tmp_path, extra_flags=()):
  """argv of a documented `python -m dyngen.<cli>` command: placeholders filled, tiny overrides appended."""
  filled = []
  for word in words[1:]:
    word = re.sub(r"^(--[a-z_]+=)(/tmp/|/path/to/)", rf"\g<1>{tmp_path}/", word)
    if word.startswith("--torch_checkpoint="):
      word = f"--torch_checkpoint={tmp_path / word.split('=', 1)[1]}"
    filled.append(word)
  return [sys.executable, *filled, *TINY_OVERRIDES[(words[2], flag_value(words, "config"))], *extra_flags]


def run_documented(words, tmp_path, extra_flags=(), timeout=900, env=None):
  result = subprocess.run(filled_command(words, tmp_path, extra_flags), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
  assert result.returncode == 0, (" ".join(words), result.stderr[-5000:])
  return result


def runnable_commands(module):
  """The documented commands of `module` that run here (all documents)."""
  return [words for _, words in documented_commands()
          if fate(words)[0] == "run" and words[2] == module and any(w.startswith("--") for w in words)]


@pytest.mark.slow
def test_readme_convert_and_sample_commands_run(tmp_path):
  # Each documented convert command (README, docs) on a tiny checkpoint of its family, written in the official
  # layout under the file name the document uses; then the README's sampling command reads the converted DiT.
  from dyngen.configs import dig_xl, dit_xl, dydit_xl  # pylint: disable=g-import-not-at-top
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  modules = {"configs/dit_xl.py:XL/2": dit_xl, "configs/dig_xl.py:XL/2": dig_xl, "configs/dydit_xl.py:XL/2": dydit_xl}
  containers = {"DiT-XL-2-256x256.pt": "raw", "SiT-XL-2-256x256.pt": "raw", "dig_xl_2.pth": "ema",
                "new_dydit0.5.pt": "ema"}
  converts = runnable_commands("dyngen.convert")
  assert len(converts) >= 4, converts
  written = {}
  for words in converts:
    config, name = flag_value(words, "config"), flag_value(words, "torch_checkpoint")
    if name in written:
      continue
    model_config = tiny_model_config(modules[config], "XL/2", TINY_OVERRIDES[("dyngen.convert", config)])
    written[name] = write_official_checkpoint(tmp_path / name, model_config, containers[name])
  processes = [subprocess.Popen(filled_command(words, tmp_path), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for words in converts]
  for words, process in zip(converts, processes):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, (" ".join(words), stderr[-5000:])
    output = pathlib.Path(re.sub("^(/tmp/|/path/to/)", f"{tmp_path}/", flag_value(words, "output")))
    assert stdout.startswith(f"wrote {output}")
    # The weights are the file's (the converter's float parity itself is tests/test_dit_fixture.py's).
    _, params = checkpoint.load_for_inference(output)
    source = written[flag_value(words, "torch_checkpoint")]
    np.testing.assert_array_equal(params["t_embedder"]["fc1"]["kernel"], source["t_embedder.mlp.0.weight"].T)

  # The README's sampling command on the converted DiT-XL/2, without its VAE (a download): it stops with one
  # clear message that names the missing field.
  (sample,) = [words for _, words in documented_commands()
               if words[:4] == ["python", "-m", "dyngen.main", "--mode=sample"]
               and flag_value(words, "workdir") == "/tmp/dit_xl_2"]
  assert "--config.latent.vae=sd-vae-ft-ema" in sample
  filled = [re.sub(r"^(--[a-z_]+=)/tmp/", rf"\g<1>{tmp_path}/", word) for word in sample[1:]
            if not word.startswith("--config.latent.vae=")]
  result = subprocess.run([sys.executable, *filled], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "--config.latent.vae=sd-vae-ft-ema" in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]


@pytest.mark.slow
def test_readme_quickstart_and_smoke_commands_run(tmp_path, digits_data_dir):
  # The README's first command (after `pip install -e .`, checked above), rerun (it resumes) and in
  # --mode=sample; the flow quickstart of docs/flow_matching.md and the README's one-minute smoke run.
  data = (f"--config.data.data_dir={digits_data_dir}",)
  (quickstart,) = [w for w in runnable_commands("dyngen.main") if flag_value(w, "config") == "configs/quickstart.py"]
  result = run_documented(quickstart, tmp_path, data)
  workdir = tmp_path / "dyngen_quickstart"
  console = result.stderr
  # What a person reads: progress lines, the final table with the files, no config dump, no clu label.
  assert re.search(r"Step 4/4 \(100%\): loss \d+\.\d+, [\d.]+ steps/s, [\d.]+ images/s, ETA", console), console
  assert "Evaluation at step 4:" in console and f"tensorboard --logdir={workdir}" in console
  assert "samples/eval_step_4.npz" in console and "checkpoints/4/" in console
  assert "Setting work unit notes" not in console and "[Hyperparameters]" not in console
  assert "Traceback" not in console
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_train_steps"] == 4 and config["sample"]["raw_grid"]  # The quickstart's, overridden.
  assert (workdir / "samples" / "grid_raw_step_4.png").exists()  # The raw weights' grid beside the EMA's.
  assert (workdir / "parameters.txt").read_text().count("blocks_0/") >= 8
  results = json.loads((workdir / "samples" / "eval_step_4.json").read_text())
  assert results["num_samples"] == 100
  assert 0 <= results["classifier_accuracy_on_samples"] <= 1 and results["frechet_distance"] >= 0
  assert results["classifier_test_accuracy"] > 0.9  # The digits classifier is a good judge of real digits.

  # The same command again resumes: it finds step 4 and has nothing left to train. Started without
  # GLIBC_TUNABLES (conftest gives it to the test processes), dyngen.main restarts itself with it.
  environ = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
  console = run_documented(quickstart, tmp_path, data, env=environ).stderr
  assert "Resumed from step 4" in console
  if host_memory.restart_needed(environ):
    assert "host memory: glibc malloc with glibc.malloc.hugetlb=1" in console
  run_documented(quickstart, tmp_path, data + ("--mode=sample", "--config.sample.num_samples=20"))
  (npz,) = (workdir / "samples").glob("*_n20.npz")
  with np.load(npz) as arrays:
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (20, 8, 8, 1)

  # The flow quickstart (README.md and docs/flow_matching.md give the same command).
  flows = [w for w in runnable_commands("dyngen.main") if flag_value(w, "config") == "configs/flow_quickstart.py"]
  assert flows and all(words == flows[0] for words in flows), flows
  run_documented(flows[0], tmp_path, data)
  results = json.loads((tmp_path / "flow_quickstart" / "samples" / "eval_step_4.json").read_text())
  assert results["num_samples"] == 100

  (smoke,) = [w for w in runnable_commands("dyngen.main") if flag_value(w, "config") == "configs/dit_s.py:S/2,runlocal"]
  run_documented(smoke, tmp_path, data)
  assert (tmp_path / "smoke" / "checkpoints" / "4").is_dir()


# The README's python blocks.


@pytest.fixture(scope="module")
def tiny_dit_xl(tmp_path_factory):
  """DiT-XL/2's config shrunk to 1 block of width 32 on 8x8x4 inputs (1000 classes kept), and its weights as
  the official DiT-XL-2-256x256.pt is laid out."""
  from dyngen.configs import dit_xl  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("official")
  config = dit_xl.get_config("XL/2")
  config.model = tiny_model_config(dit_xl, "XL/2", TINY_DIT)
  path = directory / "DiT-XL-2-256x256.pt"
  arrays = write_official_checkpoint(path, config.model, "raw")
  return config, path, arrays


def readme_python_blocks():
  blocks = [block for _, block in fenced_blocks(README, "python")]
  assert len(blocks) == 2, "the README's python blocks changed: update this test"
  return blocks


def fill(block, replacements):
  for old, new in replacements.items():
    assert block.count(old) == 1, f"the README's placeholder {old!r} moved: update this test"
    block = block.replace(old, new)
  return block


def test_readme_public_api_snippet_runs(tiny_dit_xl):
  config, path, arrays = tiny_dit_xl
  api, _ = readme_python_blocks()
  code = fill(api, {'dit_xl.get_config("XL/2")': "tiny_config()", '"DiT-XL-2-256x256.pt"': repr(str(path))})
  rng = np.random.default_rng(0)
  batch = 2
  namespace = dict(
      tiny_config=lambda: ml_collections.ConfigDict(config.to_dict()),
      x=jnp.asarray(rng.standard_normal((batch, 8, 8, 4)), jnp.float32),
      t=jnp.array([0, 999]), y=jnp.array([3, 999]), labels=jnp.array([3, 999]),
      z=jnp.asarray(rng.standard_normal((batch, 8, 8, 4)), jnp.float32),
      x_start=jnp.asarray(rng.uniform(-1, 1, (batch, 8, 8, 4)), jnp.float32), key=jax.random.key(1))
  # The training model_fn the snippet leaves to the reader: the model it just built, conditioned on y.
  namespace["model_fn_train"] = lambda x, t: namespace["model"].apply(
      {"params": namespace["params"]}, x, t, namespace["y"], train=False)
  exec(compile(code, "README.md (public API)", "exec"), namespace)  # pylint: disable=exec-used

  np.testing.assert_array_equal(namespace["params"]["x_embedder"]["proj"]["bias"], arrays["x_embedder.proj.bias"])
  assert namespace["out"].shape == (batch, 8, 8, 8)  # learn_sigma: eps and the variance interpolation.
  samples = np.asarray(namespace["samples"])
  assert samples.shape == (2 * batch, 8, 8, 4) and np.all(np.isfinite(samples))
  assert namespace["d"].num_timesteps == 250
  losses = namespace["losses"]
  assert set(losses) >= {"loss", "mse", "vb"}
  assert all(value.shape == (batch,) and np.all(np.isfinite(value)) for value in losses.values())


def test_readme_colab_snippet_runs(tiny_dit_xl, tmp_path):
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  from dyngen.convert import load  # pylint: disable=g-import-not-at-top
  config, path, _ = tiny_dit_xl
  saved = checkpoint.save_inference_checkpoint(tmp_path / "dit_xl_2", config,
                                               load.load_torch_params(path, config.model))
  _, colab = readme_python_blocks()
  namespace = {}
  exec(compile(fill(colab, {'"/content/dit_xl_2"': repr(saved)}), "README.md (Colab)", "exec"),  # pylint: disable=exec-used
       namespace)
  assert namespace["model"].hidden_size == 32 and namespace["config"].model.num_classes == 1000
  assert set(namespace["ema_params"]) >= {"x_embedder", "t_embedder", "y_embedder", "blocks_0", "final_layer"}
