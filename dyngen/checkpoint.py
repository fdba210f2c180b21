"""Orbax checkpoints of training runs, and loading their EMA weights for inference.

Layout of a run (`workdir/checkpoints/<step>/`, one folder per saved step, written atomically):

  state/    the TrainState arrays (params, opt_state, ema_params, step, rng), sharded, OCDBT
  data/     the grain iterator position, one JSON per host (absent when the iterator is not a grain one)
  config/   the run's ConfigDict as JSON, so a checkpoint is self-describing

Saves are asynchronous (arrays are copied to host memory, then written in a background thread); the last N
are kept. An inference checkpoint (`save_inference_checkpoint`, used by `python -m dyngen.convert`) has the
same layout with `state` = {"ema_params": ...} only, so `load_for_inference` reads both kinds.

A step folder that cannot be read (truncated files, a missing manifest) raises `CorruptCheckpointError`
naming it; when a whole checkpoint directory is given, the previous readable step is used instead and a
warning says which steps were skipped.
"""
import json
import os
import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"
# Where a training run moves a step folder it could not read, so that it can save that step again.
CORRUPT_SUFFIX = ".corrupt"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint folder exists but its arrays or config cannot be read."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not fit the configured model (e.g. a different width)."""


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """The ConfigDict as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_from_json_dict(data: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(data)


def report_partial_checkpoints(directory) -> list[str]:
  """Warns about the step folders a killed save left half-written (Orbax's temporary names), which the manager
  is about to delete, and returns their names: losing a save is never silent."""
  directory = epath.Path(directory)
  temporary = ocp.path.step.all_temporary_paths(directory) if directory.exists() else []
  partial = sorted(path.get().name for path in temporary)
  if partial and jax.process_index() == 0:
    logging.warning("Discarding %d partial checkpoint folder(s) in %s left by an interrupted save: %s. The run "
                    "continues from the newest complete checkpoint.", len(partial), directory, ", ".join(partial))
  return partial


def create_manager(directory, *, max_to_keep: int | None = None, async_save: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created unless read_only) keeping the `max_to_keep` latest steps.

  The trainer decides when to save, so every `save` call is honoured (save_interval_steps=1). Partial step
  folders left by a killed save are reported (`report_partial_checkpoints`), then removed by Orbax.
  """
  if not read_only:
    report_partial_checkpoints(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=1,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
      # Folders left by a save that was killed halfway are never listed as steps; remove them.
      cleanup_tmp_directories=not read_only,
  )
  # Handlers named up front, so that a fresh manager can read metadata before it has saved anything.
  handlers = {STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
              DATA: grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state, *, config: ml_collections.ConfigDict,
         data_iterator=None) -> None:
  """Starts an (asynchronous) save of `state`, the data position and the config as step `step`."""
  items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(config_to_json_dict(config))}
  if isinstance(data_iterator, grain.DatasetIterator):
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _path_name(path) -> str:
  """'opt_state/0/mu/blocks_0/...' for a tree path, the same for dataclass fields and dict keys."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def _array_shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat}


def _block_layout(names) -> bool | None:
  """True for scanned blocks (a `blocks` path segment), False for unrolled ones (`blocks_<i>`), else None."""
  segments = {segment for name in names for segment in name.split("/")}
  if "blocks" in segments:
    return True
  return False if any(re.fullmatch(r"blocks_\d+", segment) for segment in segments) else None


def _check_fits(saved_tree, abstract_tree, where: str) -> None:
  """Raises CheckpointMismatchError listing arrays whose saved shape/dtype differ from the expected ones."""
  saved, expected = _array_shapes(saved_tree), _array_shapes(abstract_tree)
  saved_scanned, expected_scanned = _block_layout(saved), _block_layout(expected)
  if None not in (saved_scanned, expected_scanned) and saved_scanned != expected_scanned:
    raise CheckpointMismatchError(
        f"the checkpoint at {where} holds {'scanned' if saved_scanned else 'unrolled'} blocks but the "
        f"configured model {'scans' if expected_scanned else 'unrolls'} them: set model.scan_blocks="
        f"{saved_scanned} as the run was started (dyngen.models.layers.stack_block_params / "
        "unstack_block_params convert parameters between the two layouts).")
  missing = sorted(set(expected) - set(saved))
  different = [f"{name}: saved {saved[name][0]} {saved[name][1]}, expected {expected[name][0]} "
               f"{expected[name][1]}" for name in sorted(set(expected) & set(saved))
               if saved[name] != expected[name]]
  if missing or different:
    details = "\n  ".join(different + [f"{name}: not in the checkpoint" for name in missing[:10]])
    raise CheckpointMismatchError(
        f"the checkpoint at {where} does not fit the configured model/optimizer:\n  {details}\n"
        "Resume with the config the run was started with (it is saved in the step's config/ folder), or "
        "start a fresh run in a new workdir.")


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step folder aside (`<step>.corrupt`), keeping it for inspection.

  Process 0 moves it; every host waits for the move before re-listing the steps, so that none still sees it.
  """
  source = manager.directory / str(step)
  target = manager.directory / f"{step}{CORRUPT_SUFFIX}"
  if jax.process_index() == 0:
    if target.exists():
      target.rmtree()
    source.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"dyngen: {target} moved aside")
  manager.reload()
  return os.fspath(target)


def _from_process_0(value: int) -> int:
  """Process 0's `value` on every host (one decision for all)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _on_every_host(ok: bool) -> bool:
  """True when `ok` holds on every host."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, data_iterator=None):
  """Restores the newest readable step into arrays laid out as `abstract_state` says.

  Args:
    manager: from `create_manager`.
    abstract_state: the TrainState of `jax.ShapeDtypeStruct`s with `.sharding` set.
    data_iterator: a grain iterator restored in place to the saved position (when the step has one).

  Returns:
    (state, step), or None when the directory has no checkpoint.

  Raises:
    CheckpointMismatchError: the newest step is readable but has other array shapes than `abstract_state`.
    CorruptCheckpointError: there are steps but none can be read (each unreadable one is moved aside).
  """
  # All hosts must resume from the same step: process 0 names each candidate (the newest it lists below the
  # last one tried), every host tries to read its part, and a step counts as readable only if it was on all.
  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  while True:
    below = skipped[-1][0] if skipped else None
    step = _from_process_0(max((s for s in manager.all_steps() if below is None or s < below), default=-1))
    if step < 0:
      break
    where = os.fspath(manager.directory / str(step))
    unreadable = RuntimeError(f"{where} could not be read on another host")
    try:
      saved_tree, error = manager.item_metadata(step)[STATE].tree, None
    except Exception as metadata_error:  # pylint: disable=broad-except
      error = metadata_error
    # Agreed before any host starts restoring: a host does not wait in Orbax for one that gave up.
    if not _on_every_host(error is None):
      skipped.append((step, error or unreadable))
      continue
    # Shape mismatches are a config error, not corruption: raise instead of falling back (the metadata, hence
    # the answer, is the same on every host).
    _check_fits(saved_tree, abstract_state, where)
    items = {STATE: ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    has_data = (manager.directory / str(step) / DATA).exists()
    if has_data and isinstance(data_iterator, grain.DatasetIterator):
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored, error = manager.restore(step, args=ocp.args.Composite(**items)), None
    except Exception as restore_error:  # pylint: disable=broad-except
      error = restore_error
    if not _on_every_host(error is None):
      skipped.append((step, error or unreadable))
      continue
    if skipped:
      moved = [_quarantine(manager, bad_step) for bad_step, _ in skipped]
      logging.warning("Resuming from step %d: the newer checkpoint(s) %s could not be read and were moved "
                      "to %s. First error: %s", step, [s for s, _ in skipped], moved, skipped[0][1])
    return restored[STATE], step
  if skipped:
    moved = [_quarantine(manager, bad_step) for bad_step, _ in skipped]
    raise CorruptCheckpointError(
        f"none of the checkpoints in {manager.directory} (steps {steps}) could be read; they were moved to "
        f"{moved}. First error: {skipped[0][1]}")
  return None


def _find_checkpoints(path) -> tuple[epath.Path, int | None]:
  """(manager directory, step or None for 'the latest') for a workdir, a checkpoints dir or a step dir."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist.")
  if (path / STATE).is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if any(child.name.isdigit() for child in path.iterdir()):
    return path, None
  raise FileNotFoundError(
      f"no checkpoint at {path}: expected a training workdir (with {CHECKPOINT_SUBDIR}/), a checkpoint "
      "directory (with numbered step folders) or one step folder (with state/ and config/).")


def _restore_for_inference(manager: ocp.CheckpointManager, step: int):
  """(config, ema_params) of one step, arrays on the default device."""
  step_dir = manager.directory / str(step)
  config = config_from_json_dict(manager.restore(step, args=ocp.args.Composite(
      **{CONFIG: ocp.args.JsonRestore()}))[CONFIG])
  saved_tree = manager.item_metadata(step)[STATE].tree
  if "ema_params" not in saved_tree:
    raise CorruptCheckpointError(f"{step_dir}/{STATE} has no ema_params (it holds {sorted(saved_tree)}).")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {"ema_params": jax.tree.map(
      lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device), saved_tree["ema_params"])}
  restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)}))
  return config, restored[STATE]["ema_params"]


def load_for_inference(path) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, EMA params) of a checkpoint, for sampling in a notebook.

  Args:
    path: a training workdir or its `checkpoints/` folder (the newest readable step is used), or one step
      folder such as `workdir/checkpoints/400000` (exactly that step).

  Returns:
    The run's ConfigDict (`config.model` builds the model with `dyngen.models.build`) and the EMA parameter
    tree as jax arrays on the first local device.

  Raises:
    FileNotFoundError: nothing that looks like a checkpoint at `path`.
    CorruptCheckpointError: the step (or, for a directory, every step) cannot be read.
  """
  directory, step = _find_checkpoints(path)
  with create_manager(directory, read_only=True) as manager:
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    errors = []
    for candidate in steps:
      try:
        result = _restore_for_inference(manager, candidate)
      except Exception as error:  # pylint: disable=broad-except
        errors.append((candidate, error))
        continue
      if errors:
        logging.warning("Loaded step %d of %s: newer step(s) %s could not be read (%s).", candidate, directory,
                        [s for s, _ in errors], errors[0][1])
      return result
  failed = ", ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in errors)
  raise CorruptCheckpointError(f"cannot read the checkpoint at {path}: {failed or 'no steps found'}")


def save_inference_checkpoint(directory, config: ml_collections.ConfigDict, params, step: int = 0) -> str:
  """Writes `params` as the EMA weights of a checkpoint that `load_for_inference(directory)` reads.

  Args:
    directory: a new or empty folder (a step folder `<directory>/<step>` is written inside).
    config: the ConfigDict describing the model (at least `config.model`).
    params: the parameter tree (e.g. converted from an official PyTorch checkpoint).
    step: the training step the weights come from, used as the folder name.

  Returns:
    The path of the step folder.
  """
  with create_manager(directory, async_save=False) as manager:
    if step in manager.all_steps():
      raise FileExistsError(f"{manager.directory} already holds a checkpoint for step {step}; choose an "
                            "empty directory.")
    manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeSave({"ema_params": params}),
        CONFIG: ocp.args.JsonSave(config_to_json_dict(config))}))
    manager.wait_until_finished()
    return os.fspath(manager.directory / str(step))


def latest_step(directory) -> int | None:
  """The newest step saved in a checkpoint directory (`workdir/checkpoints`), or None if there is none."""
  directory = epath.Path(directory)
  if not directory.exists():
    return None
  with create_manager(directory, read_only=True) as manager:
    return manager.latest_step()
