r"""dyngen's entry point: train a diffusion transformer, or sample from a trained one.

  python -m dyngen.main --config=configs/quickstart.py --workdir=/tmp/quickstart
  python -m dyngen.main --config=configs/dit_xl.py:runlocal --workdir=/tmp/smoke
  python -m dyngen.main --config=configs/dit_xl.py --workdir=gs://bucket/dit_xl \
      --config.batch_size=512 --config.mesh.shape="(-1,4,1)"
  python -m dyngen.main --mode=sample --config=configs/dit_xl.py --workdir=gs://bucket/dit_xl \
      --config.sample.num_samples=50000 --config.sample.cfg_scale=1.5

Config files load from any directory (they import only dyngen). Rerunning a training command with
the same workdir resumes from its newest checkpoint. `--config.<field>=<value>` overrides any field;
unknown fields and values of the wrong type are refused before anything runs.

A user error (a bad flag or config value, missing data, a wrong or corrupt checkpoint) prints one
`error: <message>` line and exits with status 2; internal errors keep their traceback (see dyngen/cli_errors.py;
DYNGEN_TRACEBACK=1 shows it for user errors too). `--help` lists the flags and exits 0.
"""
import logging as std_logging

from dyngen import host_memory

if __name__ == "__main__":
  # First of all: glibc reads its malloc tunables only when a process starts (dyngen/host_memory.py).
  host_memory.reexec_with_tunables()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dyngen import cli_errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: configs/<name>.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"],
                          "train: train (resuming from the workdir) and evaluate; sample: write "
                          "config.sample.num_samples images of the EMA weights as .npz and .png.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters).")
# On TPU pods and SLURM jax finds these itself; elsewhere (several processes on one machine, a GPU cluster
# without SLURM) give all three. docs/multihost.md.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --distributed: host:port of process 0 (default: detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "With --distributed: how many processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --distributed: this process's index (default: detected).")
flags.mark_flags_as_required(["config", "workdir"])


class _HideLibraryInfo(std_logging.Filter):
  """Drops INFO lines of Orbax (dozens per checkpoint), of JAX's backend probing ("Unable to initialize
  backend 'tpu'" on every machine without one), of clu's platform ("Setting work unit notes: ...", which
  repeats the trainer's own progress line) and tfds' "Load dataset info from ..." so that the progress lines
  stay readable. Warnings pass, except Orbax's two about a manager opened read-only, which dyngen does on
  purpose to read a checkpoint's step list or config; errors always pass."""

  def filter(self, record):
    if record.levelno >= std_logging.ERROR:
      return True
    path = record.pathname
    if record.levelno >= std_logging.WARNING:
      return not (path.endswith("orbax/checkpoint/checkpoint_manager.py") and "read only" in
                  record.getMessage().replace("read_only", "read only"))
    return not ("/orbax/" in path or path.endswith("xla_bridge.py") or "/clu/platform/" in path
                or ("/tensorflow_datasets/" in path and path.endswith("dataset_info.py")))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with --config.<field>=<value>.")
  logging.get_absl_handler().addFilter(_HideLibraryInfo())
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(flag.value is not None for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need --distributed.")
  # Imported after flag parsing: TensorFlow (pulled in by clu and tfds) must not claim accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from dyngen.train import trainer  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d, %d local / %d global %s devices; host memory: %s.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend(),
               host_memory.status())
  config = _CONFIG.value
  # The whole config is saved beside every checkpoint; the console gets its source and the overrides only.
  logging.info("Config %s, overrides %s", config_flags.get_config_filename(flags.FLAGS["config"]),
               config_flags.get_override_values(flags.FLAGS["config"]) or "none")
  if _MODE.value == "train":
    trainer.train_and_evaluate(config, _WORKDIR.value)
  else:
    trainer.sample(config, _WORKDIR.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli_errors.run(main)
