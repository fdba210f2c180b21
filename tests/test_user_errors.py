"""Wrong inputs are errors, never silent wrong answers: the diffusion API and the command lines.

Diffusion API: every case that used to flow on silently (a clamped timestep, an out-of-range label read past the
embedding table, a broadcast noise array, a truthy string option) is now a ValueError naming the value when the
value is concrete, and NaN in the affected rows when it is traced under jit (a host callback would sync every
step). Valid rows are compared with an independent float64 numpy formula, so the checks cannot hide a change
of the numbers.

Command lines: `python -m dyngen.main` / `python -m dyngen.convert` run in subprocesses; user errors are one
`error: ...` line on stderr and exit status 2, with no traceback; `--help` exits 0. Every case fails before any
compute, so each run costs only the imports (~1-2 s).
"""
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngen.diffusion import create_diffusion
from dyngen.diffusion import guided_model_fn
from dyngen.diffusion import guidance

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The linear schedule's ᾱ in float64, written from DDPM's definition (not from dyngen's tables).
ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
# Coefficients are gathered as float32, data are float32: a few roundings per value.
F32_RTOL = 1e-6


def q_sample_reference(x_start, original_t, noise):
  abar = ALPHAS_CUMPROD[np.asarray(original_t)].reshape(-1, 1, 1, 1)
  return np.sqrt(abar) * x_start + np.sqrt(1 - abar) * noise


def rel_err(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return np.abs(actual - reference).max() / np.abs(reference).max()


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(3, 2, 2, 1)).astype(np.float32), rng.normal(size=(3, 2, 2, 1)).astype(np.float32))


def linear_model(x, t):
  """A toy eps-and-variance model: (B, H, W, C) -> (B, H, W, 2C), depending on x and t."""
  return jnp.concatenate([0.5 * x, jnp.tanh(x) * 0 + (t / 1000.0)[:, None, None, None]], axis=-1)


# Timesteps.


def test_respaced_diffusion_refuses_original_timesteps(data):
  # The README's old snippet: a 250-step sampling diffusion fed original timesteps in [0, 1000).
  x_start, noise = data
  diffusion = create_diffusion("250")
  t = np.array([249, 500, 999])
  with pytest.raises(ValueError, match=r"t holds 500, 999 outside this diffusion's steps \[0, 250\); it is "
                                       r"respaced to 250 steps.*original timesteps 0\.\.999"):
    diffusion.training_losses(linear_model, x_start, t, noise=noise)
  with pytest.raises(ValueError, match=r"index holds 250 outside this diffusion's steps \[0, 250\)"):
    diffusion.q_sample(x_start, jnp.array([0, 250, 3]), noise)
  with pytest.raises(ValueError, match=r"index holds -1 outside"):
    diffusion.model_timesteps(-1)
  # In range, step 249 of the respaced process is original timestep 999 (the last kept).
  x_t = diffusion.q_sample(x_start, np.array([0, 100, 249]), noise)
  expected = q_sample_reference(x_start, [diffusion.timestep_map[i] for i in (0, 100, 249)], noise)
  assert diffusion.timestep_map[249] == 999 and rel_err(x_t, expected) < F32_RTOL


def test_traced_out_of_range_timesteps_are_nan_rows(data):
  # Under jit the values are unknown while tracing: a bad row becomes NaN (x_t, loss), good rows stay exact.
  x_start, noise = data
  diffusion = create_diffusion("250")
  t = jnp.array([100, 500, -1])
  x_t = np.asarray(jax.jit(diffusion.q_sample)(x_start, t, noise))
  assert np.all(np.isnan(x_t[1:])) and np.all(np.isfinite(x_t[0]))
  assert rel_err(x_t[:1], q_sample_reference(x_start[:1], [diffusion.timestep_map[100]], noise[:1])) < F32_RTOL
  losses = jax.jit(lambda t: diffusion.training_losses(linear_model, x_start, t, noise=noise))(t)
  assert np.isfinite(losses["loss"][0]) and np.all(np.isnan(losses["loss"][1:]))
  np.testing.assert_array_equal(jax.jit(diffusion.model_timesteps)(t), [diffusion.timestep_map[100], -1, -1])


def test_timestep_dtype_and_shape_are_checked_under_jit_too(data):
  x_start, noise = data
  diffusion = create_diffusion("")
  loss = lambda t: diffusion.training_losses(linear_model, x_start, t, noise=noise)
  with pytest.raises(ValueError, match="t must hold integer steps of this process, got dtype float32"):
    jax.jit(loss)(jnp.array([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match=r"t has shape \(2,\), expected \(\) or \(3,\), one step per batch row"):
    jax.jit(loss)(jnp.array([1, 2]))
  with pytest.raises(ValueError, match=r"t has shape \(3, 1\)"):
    loss(np.array([[1], [2], [3]]))


def test_noise_is_never_broadcast(data):
  x_start, noise = data
  diffusion = create_diffusion("10")
  t = np.array([1, 2, 3])
  with pytest.raises(ValueError, match=r"noise has shape \(1, 2, 2, 1\), expected x_start's shape \(3, 2, 2, 1\)"):
    diffusion.q_sample(x_start, t, noise[:1])
  with pytest.raises(ValueError, match=r"noise has shape \(2, 2, 1\), expected x's shape \(3, 2, 2, 1\)"):
    diffusion.p_sample(linear_model, jnp.asarray(x_start), 3, noise[0])
  with pytest.raises(ValueError, match=r"noise has shape \(1, 2, 2, 1\), expected x's shape"):
    diffusion.ddim_sample(linear_model, jnp.asarray(x_start), 3, noise[:1], eta=1.0)
  x_t = diffusion.q_sample(x_start, t, noise)
  with pytest.raises(ValueError, match=r"noise has shape \(2, 2, 1\), expected x_t's shape \(3, 2, 2, 1\)"):
    diffusion.loss_terms(linear_model(x_t, t), x_start, x_t, t, noise[0])
  # A list of steps is an array of steps, checked like one.
  with pytest.raises(ValueError, match="index holds 10 outside this diffusion's steps"):
    diffusion.q_sample(x_start, [1, 2, 10], noise)


@pytest.mark.parametrize("kwargs, message", [
    (dict(timestep_respacing=250), r"timestep_respacing must be a str such as '250'.*got 250 \(int\)"),
    (dict(timestep_respacing=[2.5, 3]), r"sequence of int section counts, got \[2.5, 3\]"),
    (dict(learn_sigma="False"), r"learn_sigma must be a bool, got 'False' \(str\)"),
    (dict(predict_xstart=1), r"predict_xstart must be a bool, got 1 \(int\)"),
])
def test_create_diffusion_refuses_values_that_would_pass_silently(kwargs, message):
  with pytest.raises(ValueError, match=message):
    create_diffusion(**kwargs)


def test_sampler_options_that_would_give_nan_or_pass_silently():
  diffusion = create_diffusion("10")
  x_T = jnp.ones((2, 2, 2, 1))
  # eta = 1.5: sqrt(1 - ᾱ_prev - σ²) < 0 near t = 0, so the samples would be NaN.
  with pytest.raises(ValueError, match=r"eta must be in \[0, 1\] .*got 1.5"):
    diffusion.ddim_sample_loop(linear_model, x_T, key=jax.random.key(0), eta=1.5)
  with pytest.raises(ValueError, match=r"clip_denoised must be a bool, got 'False' \(str\)"):
    diffusion.p_sample_loop(linear_model, x_T, key=jax.random.key(0), clip_denoised="False")


# Labels and guidance.


def label_apply_fn(x, t, y):
  """Output (B, H, W, 2C) depending on the label (a finite value for any int label, as a clamped gather)."""
  scale = (1.0 + jnp.clip(y, 0, 10).astype(jnp.float32))[:, None, None, None]
  return jnp.concatenate([x * scale, x * 0 + 0.25], axis=-1)


def test_labels_outside_the_models_classes_are_refused():
  x = jnp.ones((4, 2, 2, 1))
  t = jnp.full((4,), 10)
  with pytest.raises(ValueError, match=r"conditional labels \(first half of y\) 207, 360 outside the model's 10 "
                                       r"classes: expected \[0, 10\)"):
    guided_model_fn(label_apply_fn, jnp.array([207, 360, 10, 10]), 4.0, None, num_classes=10)
  with pytest.raises(ValueError, match=r"10 is the null class, which belongs only in the null half"):
    guided_model_fn(label_apply_fn, jnp.array([10, 3, 10, 10]), 4.0, None, num_classes=10)
  with pytest.raises(ValueError, match=r"the null half of y must be the null class 10 \(num_classes\) in every row, "
                                       r"got 1, 3"):
    guided_model_fn(label_apply_fn, jnp.array([1, 3, 1, 3]), 4.0, None, num_classes=10)
  with pytest.raises(ValueError, match="must be integer class indices, got dtype float32"):
    guided_model_fn(label_apply_fn, jnp.array([1.0, 3.0, 10.0, 10.0]), 4.0, None, num_classes=10)
  # The valid case is the plain guidance rule, uncond + s (cond - uncond), on the first channel.
  out = guided_model_fn(label_apply_fn, jnp.array([1, 3, 10, 10]), 4.0, None, num_classes=10)(x, t)
  np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), [11 + 4 * (2 - 11), 11 + 4 * (4 - 11)] * 2, rtol=1e-6)
  assert guidance.check_labels(np.array([0, 9]), 10) is None
  with pytest.raises(ValueError, match=r"labels 11 outside the model's 10 classes: expected \[0, 10\] \(10 = the null"):
    guidance.check_labels(np.array([0, 10, 11]), 10, allow_null=True)


def test_traced_bad_labels_give_nan_rows():
  x = jnp.ones((4, 2, 2, 1))
  t = jnp.full((4,), 10)

  @jax.jit
  def run(y):
    return guided_model_fn(label_apply_fn, y, 4.0, None, num_classes=10)(x, t)

  good = np.asarray(run(jnp.array([1, 3, 10, 10])))
  out = np.asarray(run(jnp.array([1, 207, 10, 10])))
  # Pair 1 (rows 1 and 3) holds label 207: NaN; pair 0 is untouched, bit for bit.
  assert np.all(np.isnan(out[[1, 3]])) and np.array_equal(out[[0, 2]], good[[0, 2]])


def test_guidance_channels_must_fit_the_prediction():
  x = jnp.ones((4, 2, 2, 1))
  t = jnp.full((4,), 10)
  y = jnp.array([1, 3, 10, 10])
  # The official 3 on a 1-channel model with learned variance (2 output channels): the colab failure.
  with pytest.raises(ValueError, match="guidance_channels=3 but the model outputs only 2 channels"):
    guided_model_fn(label_apply_fn, y, 4.0, 3)(x, t)
  # 2 fits the output but would mix the variance channel: refused as well.
  with pytest.raises(ValueError, match="guidance_channels=2 but x has only 1 channels: output channels from 1 on "
                                       "are variance values"):
    guided_model_fn(label_apply_fn, y, 4.0, 2)(x, t)
  with pytest.raises(ValueError, match=r"cfg_scale must be a scalar .*got shape \(2,\)"):
    guided_model_fn(label_apply_fn, y, jnp.array([4.0, 2.0]), None)
  for bad in (-1, True, 1.5):
    with pytest.raises(ValueError, match=r"guidance_channels must be a positive int, or 0 or None"):
      guided_model_fn(label_apply_fn, y, 4.0, bad)


# Command lines.


def run_cli(module, *args, cwd=REPO_ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)


def assert_user_error(result, message):
  """Exit status 2, the last stderr line is exactly `error: <message>`, and no traceback anywhere."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last == f"error: {message}", last


QUICKSTART = "--config=configs/quickstart.py"
OPTIMIZER_FIELDS = list(__import__("configs.quickstart", fromlist=["get_config"]).get_config().optimizer)


@pytest.mark.parametrize("args, message", [
    # The issue's example: ml_collections' garbled AttributeError, now one readable line.
    ([QUICKSTART, "--config.batchsize=8"], "unknown config field 'batchsize'; did you mean 'batch_size'?"),
    ([], "--config and --workdir are required (see --help)"),
    (["--config=configs/dit_xl.py:XL/3"],
     "--config=configs/dit_xl.py:XL/3: unknown model variant 'XL/3': expected <size>/<patch> with size in "
     "['B', 'L', 'S', 'XL'] and patch in (2, 4, 8), e.g. 'XL/2'"),
])
def test_flag_errors_are_one_line_and_exit_2(tmp_path, args, message):
  extra = [f"--workdir={tmp_path}"] if args else []
  assert_user_error(run_cli("dyngen.main", *args, *extra), message)
  assert not list(tmp_path.iterdir())  # Stopped before anything was written.


def parse_main_flags(argv):
  """cli_errors.parse_flags on flags defined as dyngen.main defines them, in this process (no imports to pay)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from dyngen import cli_errors  # pylint: disable=g-import-not-at-top
  flag_values = flags.FlagValues()
  argv = ["main", *argv]
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", "unused", "workdir", flag_values=flag_values)
  with pytest.raises(SystemExit) as stop:
    cli_errors.parse_flags(argv, flag_values)
  return stop.value.code


CONFIG_FILE = REPO_ROOT / "configs" / "quickstart.py"
# ml_collections loads config files with importlib's load_module (deprecated; its warning, not ours).
LOAD_MODULE_WARNING = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.mark.parametrize("args, message", [
    (["--config.optimizer.learnig_rate=1"],
     "unknown config field 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'?"),
    # No close name: the section's fields are listed (read from the config, which other work extends).
    (["--config.optimizer.lr=1e-3"],
     f"unknown config field 'optimizer.lr'; config.optimizer has {', '.join(sorted(OPTIMIZER_FIELDS))} "
     "(every field: docs/config_reference.md)"),
    (["--config.batch_size.x=1"], "config field 'batch_size' is an int, not a section: it has no field 'x'"),
    (["--config.batch_size=many"],
     "config field 'batch_size' must be an int, got 'many' (invalid literal for int() with base 10: 'many')"),
    (["--config.model.learn_sigma=maybe"], "config field 'model.learn_sigma' must be a bool (true/false, 1/0), got "
                                           "'maybe'"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
])
@LOAD_MODULE_WARNING
def test_config_field_errors_name_the_field(capsys, args, message):
  assert parse_main_flags([f"--config={CONFIG_FILE}", *args]) == 2
  stderr = capsys.readouterr().err
  assert stderr.strip().splitlines() == [f"error: {message}"]


@LOAD_MODULE_WARNING
def test_missing_config_file_is_one_line(capsys, tmp_path):
  missing = tmp_path / "no_such_config.py"
  assert parse_main_flags([f"--config={missing}"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: --config={missing}: cannot load the config file: No such file or directory: '{missing}'"]


def test_help_exits_0():
  # absl's help flags exit 1; asking for help is not a failure.
  for result in run_concurrently([("dyngen.main", "--help"), ("dyngen.convert", "-h")]):
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config" in result.stdout and "Traceback" not in result.stderr


def run_concurrently(commands, timeout=300):
  """[(module, *args)] run as parallel subprocesses (each spends seconds importing) -> CompletedProcess list."""
  processes = [subprocess.Popen([sys.executable, "-m", *command], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for command in commands]
  results = []
  for command, process in zip(commands, processes):
    stdout, stderr = process.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
  return results


def test_missing_weights_corrupt_checkpoint_and_missing_data(tmp_path):
  # Each stops inside main, after the trainer's imports (~5 s of CPU each), with the project's own message.
  empty, corrupt, missing = tmp_path / "empty", tmp_path / "corrupt", tmp_path / "no_images"
  empty.mkdir()
  (corrupt / "checkpoints" / "10").mkdir(parents=True)
  (corrupt / "checkpoints" / "10" / "state").write_text("not an Orbax checkpoint")
  no_weights, bad_checkpoint, no_data = run_concurrently([
      ("dyngen.main", QUICKSTART, f"--workdir={empty}", "--mode=sample"),
      ("dyngen.main", QUICKSTART, f"--workdir={corrupt}", "--mode=sample"),
      ("dyngen.main", QUICKSTART, f"--workdir={tmp_path / 'run'}", "--config.data.name=folder",
       f"--config.data.folder={missing}", "--config.evaluation.metric="),
  ])
  assert_user_error(no_weights, f"no checkpoint at {empty}: expected a training workdir (with checkpoints/), a "
                                "checkpoint directory (with numbered step folders) or one step folder (with state/ "
                                "and config/).")
  last = bad_checkpoint.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot read the checkpoint at {corrupt}: step 10"), last
  assert_user_error(bad_checkpoint, last[len("error: "):])
  assert_user_error(no_data, f"data.folder='{missing}' is not a directory. Point it to a folder laid out as "
                             "<folder>/<class_name>/<image>.png|jpg (one subfolder per class).")


def test_convert_errors_are_one_message(tmp_path):
  common = ["--config=configs/dit_s.py:S/2", f"--output={tmp_path / 'out'}"]
  missing = tmp_path / "missing.pt"
  official_tiny = REPO_ROOT / "tests" / "data" / "diffusion_tiny" / "checkpoint.pt"
  no_file, other_model = run_concurrently([
      ("dyngen.convert", *common, f"--torch_checkpoint={missing}"),
      ("dyngen.convert", *common, f"--torch_checkpoint={official_tiny}"),
  ])
  assert_user_error(no_file, f"cannot convert {missing}: No such file or directory: {missing}")
  # A checkpoint of another model: the list of tensors that do not fit stays a list, after one `error:` line.
  assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
  assert f"error: cannot convert {official_tiny}: the checkpoint does not fit model 'dit'" in other_model.stderr
  assert "\n  mis-shaped (" in other_model.stderr
  assert not (tmp_path / "out").exists()


def test_internal_errors_keep_their_traceback(tmp_path):
  # A ValueError raised inside a library (numpy here) may be dyngen's bug: it is not turned into a user error.
  script = tmp_path / "internal.py"
  script.write_text("import numpy as np\nfrom dyngen import cli_errors\n\n"
                    "def main(argv):\n  np.zeros(3).reshape(2, 2)\n\n"
                    "cli_errors.run(main)\n")
  result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "Traceback" in result.stderr and "cannot reshape array" in result.stderr
  assert "error: " not in result.stderr


def test_what_counts_as_a_user_error():
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  from dyngen import cli_errors  # pylint: disable=g-import-not-at-top

  def raised(fn):
    try:
      fn()
    except Exception as error:  # pylint: disable=broad-except
      return error
    raise AssertionError("expected an exception")

  assert cli_errors.is_user_error(raised(lambda: create_diffusion("fast")))  # dyngen's own check
  assert not cli_errors.is_user_error(raised(lambda: np.zeros(3).reshape(2, 2)))  # inside numpy
  assert cli_errors.is_user_error(checkpoint.CorruptCheckpointError("x"))  # a listed class, wherever raised
  assert not cli_errors.is_user_error(RuntimeError("x")) and not cli_errors.is_user_error(KeyError("x"))
  # A dyngen module run as `python -m dyngen.<name>` is named __main__: its raise sites count by their file.
  namespace = {"__name__": "__main__"}
  exec(compile("def check():\n  raise ValueError('bad value')\n", str(REPO_ROOT / "dyngen" / "main.py"), "exec"),
       namespace)  # pylint: disable=exec-used
  assert cli_errors.is_user_error(raised(namespace["check"]))


def test_a_discarded_partial_checkpoint_is_reported(tmp_path, caplog):
  # A save killed halfway leaves a step folder under Orbax's temporary name; the next run's manager deletes it.
  import logging  # pylint: disable=g-import-not-at-top
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "checkpoints"
  with checkpoint.create_manager(directory, async_save=False) as manager:
    manager.save(1, args=checkpoint.ocp.args.Composite(
        config=checkpoint.ocp.args.JsonSave({"step": 1})), force=True)
  partial = directory / "2.orbax-checkpoint-tmp-1796000000000000"
  (partial / "config").mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    with checkpoint.create_manager(directory, async_save=False) as manager:
      assert manager.all_steps() == [1]
      manager.save(3, args=checkpoint.ocp.args.Composite(
          config=checkpoint.ocp.args.JsonSave({"step": 3})), force=True)  # Waits for Orbax's cleanup.
  assert f"Discarding 1 partial checkpoint folder(s) in {directory} left by an interrupted save: {partial.name}." \
      in caplog.text
  assert not partial.exists()  # Orbax removed it, after dyngen said so.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checkpoint.create_manager(directory).close()
  assert "partial checkpoint" not in caplog.text  # Nothing left: nothing said.


# Documented recipes run as written.


def cosine_alphas_cumprod(timesteps, steps=1000):
  """ᾱ_t of Improved DDPM's cosine schedule from its formula (no cap: compared only where it does not bind)."""
  f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
  return f((np.asarray(timesteps) + 1) / steps) / f(0)


def test_colab_recipe_runs_on_a_quickstart_checkpoint(tmp_path):
  # The quickstart's config (cosine schedule, 1 channel, 10 classes, guide all channels, clipped x_0) on a
  # 1-block model with random weights: the old recipe failed here on guidance_channels=3, gave NaN for its
  # ImageNet labels and sampled with the linear schedule.
  from dyngen.configs import quickstart  # pylint: disable=g-import-not-at-top
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  from dyngen import models  # pylint: disable=g-import-not-at-top
  from dyngen.bench import measure  # pylint: disable=g-import-not-at-top

  config = quickstart.get_config()
  config.model.update(dict(hidden_size=32, depth=1, num_heads=2))
  config.sample.update(dict(num_steps=10, batch_size=8))
  model = models.build(config.model)
  example = (jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  params = measure.random_params(model, *example, scale=0.1)
  path = checkpoint.save_inference_checkpoint(tmp_path / "quickstart", config, params)

  text = (REPO_ROOT / "launch" / "colab.md").read_text()
  cells = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
  assert len(cells) == 3
  code = "\n".join(line for line in "\n".join(cells).splitlines() if not line.startswith("!"))  # shell magics
  code, count = re.subn(r'checkpoint_path = "[^"]*"', f"checkpoint_path = {str(path)!r}", code)
  assert count == 1, "the recipe's checkpoint_path placeholder moved: update this test"
  namespace = {}
  exec(compile(code, "launch/colab.md", "exec"), namespace)  # pylint: disable=exec-used

  x = np.asarray(namespace["x"])
  assert x.shape == (8, 8, 8, 1) and np.all(np.isfinite(x))
  # clip_denoised from the checkpoint: the last step returns the clipped x_0 estimate itself.
  assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
  d = namespace["d"]
  assert d.num_timesteps == 10
  kept = np.asarray(d.timestep_map)
  # The cosine schedule of the checkpoint, not the linear default (the cap of 0.999 binds only at t ~ 999).
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(d.betas))[:-1], cosine_alphas_cumprod(kept[:-1]), rtol=1e-10)
  assert namespace["image"].mode == "L" and namespace["image"].size == (8, 8)
  images = namespace["images"]
  assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1)
