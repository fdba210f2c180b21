r"""Converts an official PyTorch checkpoint (DiT, ...) into a dyngen Orbax checkpoint for sampling.

  python -m dyngen.convert --config=configs/dit_xl.py --torch_checkpoint=DiT-XL-2-256x256.pt \
      --output=/tmp/dit_xl_256
  python -m dyngen.convert --config=configs/dit_xl.py --config.model.input_size=64 \
      --torch_checkpoint=DiT-XL-2-512x512.pt --output=/tmp/dit_xl_512

`config.model` must describe the checkpoint's architecture (`--config.model.<field>=` overrides any field);
a mismatch stops with the list of missing, unexpected and mis-shaped tensors. The file is read without
torch and without running code stored in it. The output holds the weights as the EMA params of a
checkpoint, with the whole config, so that `dyngen.checkpoint.load_for_inference(output)` and
`python -m dyngen.main --mode=sample --workdir=...` read it.

A file that cannot be read, is unsafe or does not fit the model prints one `error: <message>` line and exits with
status 2 (see dyngen/cli_errors.py).
"""
import os
import pickle
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dyngen import checkpoint
from dyngen import cli_errors
from dyngen import progress
from dyngen.convert import load

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file whose `model` describes the checkpoint: configs/<name>.py[:arg].",
    lock_config=True)
_TORCH_CHECKPOINT = flags.DEFINE_string("torch_checkpoint", None, "The PyTorch .pt/.pth file to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "A new or empty directory (local or gs://) for the Orbax checkpoint.")
_STEP = flags.DEFINE_integer("step", 0, "Training step to record the weights under (the step folder's name).")
flags.mark_flags_as_required(["config", "torch_checkpoint", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with --config.<field>=<value>.")
  config = _CONFIG.value
  if "model" not in config:
    raise app.UsageError("the config has no `model` field describing the checkpoint's architecture.")
  # Reading an XL checkpoint takes a while (2.7 GB): each phase says what it does and how long it took.
  start = time.perf_counter()
  size = f" ({os.path.getsize(_TORCH_CHECKPOINT.value) / 1e6:.4g} MB)" if os.path.isfile(_TORCH_CHECKPOINT.value) else ""
  logging.info("Reading %s%s for %s.", _TORCH_CHECKPOINT.value, size, load.describe(config.model))
  try:
    params = load.load_torch_params(_TORCH_CHECKPOINT.value, config.model)
  except (OSError, ValueError, pickle.UnpicklingError) as error:  # unreadable, unsafe or not fitting the model
    message = cli_errors.error_message(error)
    raise cli_errors.UserError(f"cannot convert {_TORCH_CHECKPOINT.value}: {message}") from error
  count = sum(p.size for p in jax.tree.leaves(params))
  logging.info("Read and mapped %s parameters in %s; writing the Orbax checkpoint to %s.", f"{count:,}",
               progress.format_seconds(time.perf_counter() - start), _OUTPUT.value)
  path = checkpoint.save_inference_checkpoint(_OUTPUT.value, config, params, step=_STEP.value)
  logging.info("Converted %s (%d parameters) to %s in %s.", _TORCH_CHECKPOINT.value, count, path,
               progress.format_seconds(time.perf_counter() - start))
  print(f"wrote {path} ({count:,} parameters)")


if __name__ == "__main__":
  cli_errors.run(main)
