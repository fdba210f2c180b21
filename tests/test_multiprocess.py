"""Several processes on one machine, as a pod runs them: 2 processes x 4 CPU devices against 1 process x 8.

One family of `python -m dyngen.main` runs (module fixture `runs`), started from a scratch directory with a
config file written there (config files load from anywhere), shared by the tests below:

  killed     2 x 4, trains towards 1000 steps, checkpoint every 2; both processes are killed with SIGKILL once
             checkpoint 4 exists (the newest one, L >= 4, is whatever the kill left)
  resumed    2 x 4 in the same workdir after the newest step L was corrupted: both resume from L - 2 and train
             to F = L + 4
  reference  1 x 8, the same config straight to F
  sampled    --mode=sample of `resumed` (2 x 4) and of `reference` (1 x 8)
  epoch      2 processes read one epoch of the input pipeline, each its own rows of every global batch

The 2-process commands are the ones `launch/localhost.sh` starts (its dry run prints them): jax.distributed with
a coordinator on localhost (docs/multihost.md). CPU collectives between processes are gloo's (jax's default).
"""
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dyngen import checkpoint
from dyngen import data as data_lib

pytestmark = pytest.mark.slow

TINY_CONFIG = '''"""A 1-block DiT of width 32 on the 8x8 digits (tests/test_multiprocess.py)."""
import ml_collections

from dyngen import data as data_lib
from dyngen.recipes import common


def get_config(arg=None):
  del arg
  config = common.training_config()
  config.data = data_lib.default_config("digits")
  config.data.read_threads = 1
  config.model = ml_collections.ConfigDict(dict(
      name="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
      mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True, attention="xla",
      attention_chunk_size=1024, dtype="float32", remat=False))
  config.batch_size = 16
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.sample_every_steps = 0
  config.profile.num_steps = 0
  config.optimizer.learning_rate = 1e-3
  config.sample.update(dict(num_steps=4, batch_size=8, num_samples=16, grid_size=8, guidance_channels=0))
  return config
'''
TIMEOUT_S = 600
LOCALHOST_SH = pathlib.Path(__file__).resolve().parents[1] / "launch" / "localhost.sh"
# One epoch of the digits (1,497 examples, 94 global batches of 16) read by each of 2 processes, as the trainer
# reads it (process index and count from jax.distributed).
READ_AN_EPOCH = """
import sys
import jax
import numpy as np
import ml_collections
from dyngen import data
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
config = ml_collections.ConfigDict(dict(data.default_config("digits"), data_dir=sys.argv[3], read_threads=1))
iterator = data.create_input_pipeline(config, global_batch_size=16, seed=0)
batches = [next(iterator) for _ in range(94)]
np.savez(sys.argv[4], image=np.stack([b["image"] for b in batches]), label=np.stack([b["label"] for b in batches]))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def localhost_commands(processes, devices, flags, env):
  """The commands `launch/localhost.sh` runs (from its dry run), one per process."""
  result = subprocess.run(["bash", str(LOCALHOST_SH), str(processes), str(devices), *flags], check=True, text=True,
                          capture_output=True, env=dict(env, DRY_RUN="1", PYTHON=sys.executable, PORT=str(free_port())))
  return [shlex.split(line) for line in result.stdout.splitlines()]


class Launch:
  """`python -m dyngen.main` in `processes` processes of `devices` CPU devices each."""

  def __init__(self, scratch, name, *, processes, devices, flags):
    self.logs = [scratch / f"{name}.{i}.log" for i in range(processes)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(scratch / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if processes > 1:
      commands = localhost_commands(processes, devices, flags, env)
    else:
      commands = [[sys.executable, "-m", "dyngen.main", *flags, f"--jax_num_cpu_devices={devices}"]]
    self.procs = []
    for command, log in zip(commands, self.logs, strict=True):
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(command, cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT))

  def text(self, index) -> str:
    return self.logs[index].read_text()

  def wait(self):
    deadline = time.monotonic() + TIMEOUT_S
    for index, proc in enumerate(self.procs):
      try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"process {index} did not finish in {TIMEOUT_S} s:\n{self.text(index)[-3000:]}")
      assert proc.returncode == 0, f"process {index} exited {proc.returncode}:\n{self.text(index)[-3000:]}"
    return self

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
      proc.wait()


def steps_in(checkpoint_dir) -> list[int]:
  """Finished steps: Orbax renames a step folder to its number when the save is complete."""
  return sorted(int(p.name) for p in pathlib.Path(checkpoint_dir).iterdir() if p.name.isdigit())


def train_flags(config_path, workdir, data_dir, steps):
  return [f"--config={config_path}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.num_train_steps={steps}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  scratch = tmp_path_factory.mktemp("multiprocess")
  config_path = scratch / "tiny.py"
  config_path.write_text(TINY_CONFIG)
  data_dir = scratch / "tensorflow_datasets"
  data_config = data_lib.default_config("digits")
  data_config.data_dir = str(data_dir)
  data_lib.dataset_info(data_config)  # Built once here, not by two processes at the same time.
  coordinator = f"localhost:{free_port()}"
  readers = [subprocess.Popen([sys.executable, "-c", READ_AN_EPOCH, coordinator, str(index), str(data_dir),
                               str(scratch / f"epoch_{index}.npz")],
                              cwd=scratch, env=dict(os.environ, JAX_PLATFORMS="cpu")) for index in range(2)]
  assert [reader.wait(timeout=TIMEOUT_S) for reader in readers] == [0, 0]
  killed_dir, reference_dir = scratch / "two_processes", scratch / "one_process"
  checkpoints = killed_dir / checkpoint.CHECKPOINT_SUBDIR

  killed = Launch(scratch, "killed", processes=2, devices=4,
                  flags=train_flags(config_path, killed_dir, data_dir, 1000))
  deadline = time.monotonic() + TIMEOUT_S
  while not (checkpoints.exists() and 4 in steps_in(checkpoints)):
    if any(proc.poll() is not None for proc in killed.procs) or time.monotonic() > deadline:
      killed.kill()
      pytest.fail(f"the 2-process run stopped before checkpoint 4:\n{killed.text(0)[-3000:]}")
    time.sleep(0.05)
  killed.kill()
  newest = steps_in(checkpoints)[-1]
  corrupted = checkpoints / str(newest)
  data_files = [f for f in (corrupted / checkpoint.STATE).rglob("*") if f.is_file() and f.parent.name == "d"]
  for data_file in data_files:  # Truncated, as a crash of the storage layer would leave them.
    data_file.write_bytes(data_file.read_bytes()[:7])
  final = newest + 4
  resumed = Launch(scratch, "resumed", processes=2, devices=4,
                   flags=train_flags(config_path, killed_dir, data_dir, final)).wait()
  reference = Launch(scratch, "reference", processes=1, devices=8,
                     flags=train_flags(config_path, reference_dir, data_dir, final)).wait()
  sampled = {name: Launch(scratch, f"sample_{name}", processes=processes, devices=devices,
                          flags=train_flags(config_path, workdir, data_dir, final) + ["--mode=sample"]).wait()
             for name, processes, devices, workdir in [("two", 2, 4, killed_dir), ("one", 1, 8, reference_dir)]}
  return ml_collections.ConfigDict(dict(
      scratch=scratch, two=killed_dir, one=reference_dir, killed=killed, resumed=resumed, reference=reference,
      sampled=sampled, corrupted_step=newest, final=final, data_config=data_config.to_dict()))


def restore_state(workdir, step) -> dict:
  """The whole TrainState tree of one step as numpy arrays, read in this (single-device) process."""
  with checkpoint.create_manager(workdir / checkpoint.CHECKPOINT_SUBDIR, read_only=True) as manager:
    metadata = manager.item_metadata(step)[checkpoint.STATE].tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(**{checkpoint.STATE: ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))}))
  return jax.tree.map(np.asarray, restored[checkpoint.STATE])


def losses(workdir) -> dict[int, float]:
  """{step: train/loss} from process 0's TensorBoard files (a rerun's value wins for a step logged twice)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for events in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      for value in event.summary.value:
        if value.tag == "train/loss":
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def test_every_example_once_per_epoch_across_processes(runs):
  parts = [np.load(runs.scratch / f"epoch_{index}.npz") for index in range(2)]
  # Global batch s = process 0's rows, then process 1's (the order of their devices in the mesh).
  stream = {key: np.concatenate([parts[0][key], parts[1][key]], axis=1).reshape(94 * 16, *parts[0][key].shape[2:])
            for key in ("image", "label")}
  single = data_lib.create_input_pipeline(ml_collections.ConfigDict(runs.data_config), global_batch_size=16,
                                          seed=0, process_index=0, process_count=1)
  expected = [next(single) for _ in range(94)]
  # Exactly the one-process stream, whose first 1,497 examples are the train split once each (test_data.py).
  np.testing.assert_array_equal(stream["image"], np.concatenate([b["image"] for b in expected]))
  np.testing.assert_array_equal(stream["label"], np.concatenate([b["label"] for b in expected]))
  images, labels = data_lib.load_split_arrays(ml_collections.ConfigDict(runs.data_config), "train")
  first_epoch = stream["image"][:1497].reshape(1497, -1)
  order, reference_order = np.lexsort(first_epoch.T), np.lexsort(images.reshape(1497, -1).T)
  np.testing.assert_array_equal(first_epoch[order], images.reshape(1497, -1)[reference_order])
  np.testing.assert_array_equal(stream["label"][:1497][order], labels[reference_order])


def test_two_processes_train_as_one(runs):
  two, one = restore_state(runs.two, runs.final), restore_state(runs.one, runs.final)
  assert int(two["step"]) == int(one["step"]) == runs.final
  # The same global batches on the same 8-device mesh, but the gradient all-reduce sums the devices' partial
  # gradients in another order over gloo between processes than XLA does within one: float32 sums differ in
  # the last bit (measured: losses 1 ulp apart from step 2 on, parameters 3e-8 apart after 8 steps of AdamW at
  # lr 1e-3). 1e-6 is 1/1000 of one step's update: a wrong batch, step or restore is off by ~lr or more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), two, one)
  one_losses, two_losses = losses(runs.one), losses(runs.two)
  assert sorted(one_losses) == list(range(1, runs.final + 1))
  # Every step the 2-process runs logged (the killed run's last ones may not have reached the disk).
  assert set(range(runs.corrupted_step - 1, runs.final + 1)) <= set(two_losses)
  for step, loss in two_losses.items():
    np.testing.assert_allclose(loss, one_losses[step], rtol=1e-5, err_msg=f"step {step}")


def test_both_processes_resume_from_the_same_readable_step(runs):
  previous = runs.corrupted_step - 2
  for index in (0, 1):
    log = runs.resumed.text(index)
    assert f"Resumed from step {previous} of" in log, log[-3000:]
    assert f"Resuming from step {previous}: the newer checkpoint(s) [{runs.corrupted_step}] could not be read" in log
  checkpoints = runs.two / checkpoint.CHECKPOINT_SUBDIR
  # Moved aside once (by process 0), then saved again by the resumed run.
  assert (checkpoints / f"{runs.corrupted_step}{checkpoint.CORRUPT_SUFFIX}").is_dir()
  assert runs.corrupted_step in steps_in(checkpoints) and runs.final in steps_in(checkpoints)
  # One checkpoint written by both processes: a data position per process, one set of arrays.
  step_dir = checkpoints / str(runs.final)
  assert sorted(p.name for p in (step_dir / checkpoint.DATA).glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def test_sampling_across_processes_writes_each_sample_once(runs):
  (path,) = (runs.two / "samples").glob("*.npz")  # <model>_<sampler><steps>_cfg<scale>_seed<seed>_n16.npz
  name = path.stem
  two = np.load(path)
  one = np.load(runs.one / "samples" / f"{name}.npz")
  assert two["arr_0"].shape[0] == 16
  np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
  np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
  # Process 0 wrote the 2 batches of 8 and merged them; nothing else (no second copy, partial or batch file).
  assert sorted(p.name for p in (runs.two / "samples").rglob("*")) == [f"{name}.npz", f"{name}.png"]
  assert "Sampled batch 2/2 (8 images)" in runs.sampled.two.text(0)


def test_process_flags_without_distributed_are_refused(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dyngen.main", "--config=configs/quickstart.py",
                           f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode != 0
  assert "--coordinator_address, --num_processes and --process_id need --distributed" in result.stderr
  assert not any(tmp_path.iterdir())


def test_localhost_launcher_stops_when_a_process_fails(tmp_path):
  # Both processes refuse a missing config file; the launcher reports the first to fail and stops the other,
  # which may not have got as far as writing its own error.
  result = subprocess.run(["bash", str(LOCALHOST_SH), "2", "1", f"--config={tmp_path}/missing.py",
                           f"--workdir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable, PORT=str(free_port())), check=False)
  assert result.returncode == 1 and "a process failed: see ./process_*.log" in result.stderr
  logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert any("missing.py" in log for log in logs), logs
