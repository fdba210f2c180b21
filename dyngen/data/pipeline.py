"""The grain input pipeline: shuffled, repeated, sharded per host, checkpointable.

Order of operations (all lazy, per index):

  source -> shuffle(seed) -> repeat (reshuffled each epoch) -> decode + ADM crop -> random flip
         -> host_batches (this host's rows of each global batch) -> to [-1, 1]

The shard is taken after shuffling and repeating: global step s consumes the elements [s * B, (s + 1) * B)
of one global stream, and host p reads rows [p * b, (p + 1) * b) of them (b = B / P), the rows that its
devices hold in the global batch array. So the global batch is the same array whatever the number of hosts
(a run on 2 hosts computes what one host computes), and hosts never see the same element within an epoch.
The flip is drawn from the element's index in that global stream, so it is reproducible too.

The iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON-able dict (how many batches were
read) and `set_state(state)` resumes exactly there. Save it beside the train state with Orbax:

  import grain, orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data_iterator=grain.checkpoint.CheckpointSave(data_iterator)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_train_state),
      data_iterator=grain.checkpoint.CheckpointRestore(data_iterator)))  # restores data_iterator in place

grain writes one `process_<i>-of-<n>.json` per host into the `data_iterator` item folder, so a run
resumes with the same number of hosts and the same `worker_count` (the state's layout depends on both);
the batches themselves do not depend on `worker_count`.

With `config.data.worker_count > 0` batches are produced in that many worker processes
(`mp_prefetch`); that needs a `if __name__ == "__main__"` guard and absl flags parsed (`app.run`), as
`dyngen.main` does. The default 0 works everywhere (tests, notebooks) and uses threads only.
"""
import functools
import sys

import grain
import ml_collections
import numpy as np

from dyngen.data import sources
from dyngen.data import transforms


def default_config(name: str = "digits") -> ml_collections.ConfigDict:
  """`config.data` with the defaults of `name` ("digits", "imagenet2012" or "folder").

  Fields: name; data_dir ("" = tfds default, $TFDS_DATA_DIR or ~/tensorflow_datasets); image_size (pixels
  of the square images; ADM/DiT use 256 or 512 for ImageNet, the digits are natively 8); folder (root
  of class subfolders, for name="folder"); random_flip (horizontal flips; off for digits, whose classes
  are not mirror-symmetric); worker_count (grain worker processes; 0 = in-process); read_threads
  (threads decoding in each process).
  """
  if name not in sources.DATASET_NAMES:
    raise ValueError(f"name={name!r} is not a dataset of dyngen; use one of {sources.DATASET_NAMES}.")
  return ml_collections.ConfigDict({
      "name": name,
      "data_dir": "",
      "image_size": {"digits": 8, "imagenet2012": 256, "folder": 256}[name],
      "folder": "",
      "random_flip": name != "digits",
      "worker_count": 0,
      "read_threads": 8,
  })


def check_pipeline_args(global_batch_size, seed, process_index, process_count, num_epochs):
  """(process_index, process_count), defaulted to this process's; ValueError naming any argument that cannot
  describe a pipeline. Shared by every pipeline (pixels here, latents in dyngen.data.latents)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count} (every host reads an equal share).")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs={num_epochs} must be None (repeat forever) or a positive int.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's seed range).")
  return process_index, process_count


def host_batches(dataset: grain.MapDataset, *, global_batch_size: int, process_index: int, process_count: int,
                 drop_remainder: bool) -> grain.MapDataset:
  """This host's part of each global batch of `dataset`: rows [p * b, (p + 1) * b) of elements
  [s * B, (s + 1) * B) at step s, with b = B // P.

  `make_array_from_process_local_data` puts host p's rows on host p's devices, which come p-th in
  `jax.devices()` and so in the mesh: contiguous rows make the global array the single-host one. (Taking
  every P-th element would give the same examples in another order, and other noise per example.)
  """
  local_batches = dataset.batch(global_batch_size // process_count, drop_remainder=drop_remainder)
  if drop_remainder and len(dataset) < sys.maxsize:  # Finite (not repeated forever): whole global batches only.
    local_batches = local_batches[:len(local_batches) // process_count * process_count]
  return local_batches[process_index::process_count]


def create_input_pipeline(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "train",
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
  """An iterator over this host's batches of `split`.

  Args:
    data_config: `config.data` (see `default_config`).
    global_batch_size: examples per step over all hosts; must divide by `process_count`.
    seed: fixes the order and the flips; the same seed gives the same batches.
    process_index, process_count: this host and the number of hosts; default `jax.process_index()`
      and `jax.process_count()`.
    split: "train"/"test" (digits), "train"/"validation" (imagenet2012), "train" (folder).
    shuffle: False reads the split in stored order (e.g. for evaluation).
    num_epochs: None repeats forever (training); an int stops after that many passes.
    drop_remainder: drop the last partial batch of a finite pipeline (always True when repeating forever).

  Returns:
    A `grain.DatasetIterator` yielding {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)} with
    b = global_batch_size // process_count, and `get_state()` / `set_state()` for checkpointing.
  """
  process_index, process_count = check_pipeline_args(global_batch_size, seed, process_index, process_count,
                                                     num_epochs)
  image_size = sources.validate_image_size(data_config)
  worker_count = data_config.get("worker_count", 0)
  if worker_count < 0:
    raise ValueError(f"config.data.worker_count={worker_count} must be >= 0 (0 = no worker processes).")
  source = sources.open_split(data_config, split)  # Also checks data_config.name.
  channels = sources.DATASET_CHANNELS[data_config.name]

  dataset = grain.MapDataset.source(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(transforms.DecodeAndCenterCrop(image_size, channels))
  if data_config.get("random_flip", False):
    # Its own seed, derived from `seed`, so flips do not repeat the shuffle's random stream.
    dataset = dataset.random_map(transforms.RandomFlipLeftRight(),
                                 seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
  dataset = host_batches(dataset, global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, drop_remainder=drop_remainder)
  dataset = dataset.map(transforms.ScaleToSymmetricRange())
  read_threads = data_config.get("read_threads", 8)
  if read_threads < 0:
    raise ValueError(f"config.data.read_threads={read_threads} must be >= 0 (0 = decode in the caller's thread).")
  # Elements are whole batches here: each thread decodes one batch, and the buffer holds a few batches
  # (grain's default of 500 elements would hold 500 batches: ~100 GB of 256px ImageNet).
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * max(read_threads, 1)))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_dataset)


def load_split_arrays(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole (small) split in stored order, as the pipeline preprocesses it but without flips.

  Cached in memory per (dataset, data_dir, image_size, split); the arrays are read-only.

  Returns:
    images: float32 (N, H, W, C) in [-1, 1]; labels: int32 (N,).
  """
  sources.validate_image_size(data_config)
  return _load_split_arrays(data_config.name, sources.resolve_data_dir(data_config), data_config.image_size,
                            data_config.get("folder", ""), split)


@functools.lru_cache(maxsize=8)
def _load_split_arrays(name: str, data_dir: str, image_size: int, folder: str, split: str):
  data_config = ml_collections.ConfigDict(
      {"name": name, "data_dir": data_dir, "image_size": image_size, "folder": folder})
  source = sources.open_split(data_config, split)
  decode = transforms.DecodeAndCenterCrop(image_size, sources.DATASET_CHANNELS[name])
  examples = [decode.map(source[i]) for i in range(len(source))]
  batch = transforms.ScaleToSymmetricRange().map({
      "image": np.stack([e["image"] for e in examples]),
      "label": np.array([e["label"] for e in examples])})
  for array in batch.values():
    array.setflags(write=False)
  return batch["image"], batch["label"]
