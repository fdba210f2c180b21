"""Training input from extracted SD-VAE latents (`python -m dyngen.latent.extract`): a grain pipeline.

  data_config = latents.default_config("/path/to/latents")        # config.data naming the latent folder
  iterator = latents.create_latent_pipeline(data_config, global_batch_size=256, seed=0)
  batch = next(iterator)                 # {"mean", "std": float32 (b, h, w, 4), "label": int32 (b,)}
  x0 = latents.sample_latents(batch["mean"], batch["std"], key, scale_factor)   # inside the jitted step
  step_batch = latents.training_batch(batch, key, scale_factor)   # the same as {"image": x0, "label": ...}

Order of operations mirrors the pixel pipeline (dyngen/data/pipeline.py), so batches are reproducible and
resumable in the same way:

  shards -> shuffle(seed) -> repeat -> decode record + random flip -> pipeline.host_batches

The flip picks the record's `mean_flip`/`std_flip` (the posterior of the mirrored image, encoded at
extraction) instead of mirroring the latent: the VAE is not flip-equivariant. The posterior sample is drawn
in the train step with the step's key (DiT draws a fresh sample every time an image is seen), so the
iterator itself is deterministic and its state is what `get_state()` saves.
"""
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dyngen.data import pipeline
from dyngen.data import sources

METADATA_FILE = "metadata.json"  # written by dyngen.latent.extract
FORMAT = "dyngen-latents"


def default_config(latent_dir: str = "") -> ml_collections.ConfigDict:
  """`config.data` for training on extracted latents.

  Fields: name ("latents"); latent_dir (the --output of the extraction); random_flip (use the flipped
  image's posterior with probability 1/2); worker_count and read_threads as in the pixel pipeline.
  """
  return ml_collections.ConfigDict({
      "name": "latents",
      "latent_dir": latent_dir,
      "random_flip": True,
      "worker_count": 0,
      "read_threads": 8,
  })


def read_metadata(latent_dir: str) -> dict:
  """metadata.json of an extraction, checked: every shard present (else: which are missing, and the fix)."""
  if not latent_dir:
    raise ValueError("config.data.latent_dir is empty; set it to the --output folder of "
                     "`python -m dyngen.latent.extract`")
  path = os.path.join(latent_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.latent_dir={latent_dir!r} holds no {METADATA_FILE}: extract the latents "
                            "first with `python -m dyngen.latent.extract --data=... --vae=... "
                            f"--output={latent_dir}`")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} metadata file (format={metadata.get('format')!r})")
  missing = [name for name in shard_paths(latent_dir, metadata) if not os.path.isfile(name)]
  if missing:
    raise FileNotFoundError(
        f"the extraction in {latent_dir} is incomplete: {len(missing)} of {metadata['num_shards']} shards are "
        f"missing (first: {os.path.basename(missing[0])}); rerun the same `python -m dyngen.latent.extract` "
        "command (on every host) to finish it")
  return metadata


def shard_paths(latent_dir: str, metadata: dict) -> list[str]:
  from dyngen.latent import extract  # pylint: disable=g-import-not-at-top
  return [os.path.join(latent_dir, extract.shard_file_name(s, metadata["num_shards"]))
          for s in range(metadata["num_shards"])]


def latent_info(data_config) -> sources.DatasetInfo:
  """What the trainer needs before the first batch: image_shape is the latent (h, w, 4)."""
  metadata = read_metadata(data_config.latent_dir)
  return sources.DatasetInfo(
      name="latents", image_shape=tuple(metadata["latent_shape"]), num_classes=len(metadata["class_names"]),
      num_examples={"train": metadata["num_examples"]}, class_names=tuple(metadata["class_names"]))


class DecodeLatentRecord(grain.transforms.RandomMap):
  """Record bytes -> {"mean", "std": (h, w, C) float32, "label": int32}; the flipped posterior w.p. 1/2.

  grain seeds `rng` from the pipeline seed and the element's position in the global stream, so the choice
  is reproducible and independent of worker counts (as RandomFlipLeftRight in the pixel pipeline).
  """

  def __init__(self, random_flip: bool):
    self.random_flip = random_flip

  def random_map(self, element, rng: np.random.Generator):
    from dyngen.latent import extract  # pylint: disable=g-import-not-at-top
    record = extract.decode_record(element)
    flip = self.random_flip and rng.random() < 0.5
    suffix = "_flip" if flip else ""
    return {"mean": record["mean" + suffix], "std": record["std" + suffix], "label": np.int32(record["label"])}


class StackLatentBatch(grain.transforms.Map):
  """grain's batch of dicts already stacks; this fixes the dtypes the train step expects."""

  def map(self, batch):
    return {"mean": batch["mean"].astype(np.float32), "std": batch["std"].astype(np.float32),
            "label": batch["label"].astype(np.int32)}


def create_latent_pipeline(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
  """An iterator over this host's batches of extracted latents (the interface of create_input_pipeline).

  Args:
    data_config: `config.data` with `latent_dir` (see `default_config`).
    global_batch_size, seed, process_index, process_count, shuffle, num_epochs, drop_remainder: as in
      `dyngen.data.create_input_pipeline`.

  Returns:
    A `grain.DatasetIterator` yielding {"mean", "std": float32 (b, h, w, 4) unscaled posterior parameters,
    "label": int32 (b,)} with b = global_batch_size // process_count, and get_state() / set_state().
  """
  process_index, process_count = pipeline.check_pipeline_args(global_batch_size, seed, process_index,
                                                              process_count, num_epochs)
  worker_count = data_config.get("worker_count", 0)
  read_threads = data_config.get("read_threads", 8)
  if worker_count < 0 or read_threads < 0:
    raise ValueError(f"config.data.worker_count={worker_count} and read_threads={read_threads} must be >= 0.")
  metadata = read_metadata(data_config.latent_dir)
  source = grain.sources.ArrayRecordDataSource(shard_paths(data_config.latent_dir, metadata))
  if len(source) != metadata["num_examples"]:
    raise ValueError(f"the shards in {data_config.latent_dir} hold {len(source)} records, metadata.json says "
                     f"{metadata['num_examples']}; extract again into an empty folder")

  dataset = grain.MapDataset.source(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  # Its own seed, derived from `seed`, as the pixel pipeline's flip.
  dataset = dataset.random_map(DecodeLatentRecord(data_config.get("random_flip", True)),
                               seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
  dataset = pipeline.host_batches(dataset, global_batch_size=global_batch_size, process_index=process_index,
                                  process_count=process_count, drop_remainder=drop_remainder)
  dataset = dataset.map(StackLatentBatch())
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * max(read_threads, 1)))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_dataset)


def sample_latents(mean, std, key, scale_factor):
  """DiT's training latents from the stored posterior: scale_factor * (mean + std * N(0, I)).

  Pure and jittable; call it inside the train step with the step's key. mean, std: (B, h, w, C).
  """
  noise = jax.random.normal(key, mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
  return (scale_factor * (mean + std * noise)).astype(mean.dtype)


def training_batch(batch, key, scale_factor):
  """The train step's {"image", "label"} of a latent batch: "image" = sample_latents(mean, std, key, scale)."""
  return {"image": sample_latents(batch["mean"], batch["std"], key, scale_factor), "label": batch["label"]}
