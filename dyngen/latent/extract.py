r"""Latent extraction: images -> SD-VAE posterior mean and std, in array_record shards, resumable.

  python -m dyngen.latent.extract --data=imagenet2012 --vae=PATH --output=DIR [--image_size=256]
  python -m dyngen.latent.extract --data=path/to/class_folders --vae=PATH --output=DIR

`--data` is a tfds dataset name (imagenet2012, prepared in array_record format in --data_dir) or a folder of
class subfolders (read through dyngen.data's folder dataset). Every image goes through the pipeline's ADM
centre crop (dyngen.data.transforms), is scaled to [-1, 1] and encoded together with its horizontal flip.

Output layout (DIR):
  metadata.json                               what was extracted (data, image size, VAE, shard layout,
                                              latent shape, class names); a rerun must match it
  latents-SSSSS-of-NNNNN.array_record         shard S = split indices [S * shard_size, (S + 1) * shard_size)
Each record is a msgpack dict (flax.serialization) {"mean", "std", "mean_flip", "std_flip": float32
(h, w, 4) unscaled posterior parameters (std = exp(logvar / 2)), "label": int32, "index": int (position in
the split)}, records in index order. `dyngen.data.latents` reads them for training.

Resuming: a shard is written under a temporary name and renamed when complete (an atomic rename in the same
folder), so after a kill (even SIGKILL) a rerun of the same command skips the complete shards, deletes
partial files and writes each missing shard once: every image ends up in exactly one record.

Hosts and devices: process p of P (jax.process_index / process_count, or --process_index/--process_count)
takes shards p, p + P, ...; within a process, each batch is split over the local devices by a data-parallel
jit (batch_size must divide by the local device count). With --distributed, jax.distributed.initialize()
runs first (multi-host TPU pods, GPU clusters).
"""
import dataclasses
import glob
import hashlib
import json
import os
import time

from absl import flags
import grain
import jax
import jax.numpy as jnp
import numpy as np

from dyngen.latent import autoencoder as autoencoder_lib

FORMAT = "dyngen-latents"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
RECORD_KEYS = ("mean", "std", "mean_flip", "std_flip", "label", "index")


def shard_file_name(shard: int, num_shards: int) -> str:
  return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_range(shard: int, shard_size: int, num_examples: int) -> tuple[int, int]:
  """[start, end) split indices of `shard`."""
  return shard * shard_size, min((shard + 1) * shard_size, num_examples)


def process_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards process `process_index` writes: every `process_count`-th, starting at its index."""
  return list(range(process_index, num_shards, process_count))


def encode_record(mean, std, mean_flip, std_flip, label, index) -> bytes:
  """One image's record (see the module docstring); arrays (h, w, C) float32."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  return serialization.msgpack_serialize({
      "mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32),
      "mean_flip": np.asarray(mean_flip, np.float32), "std_flip": np.asarray(std_flip, np.float32),
      "label": np.int32(label), "index": int(index)})


def decode_record(data: bytes) -> dict:
  """The dict of `encode_record` (msgpack: no code runs while reading)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  return serialization.msgpack_restore(data)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def data_config_of(data: str, image_size: int, data_dir: str = "", read_threads: int = 8):
  """The `config.data` of `--data`: a folder of class subfolders, or a tfds name (imagenet2012)."""
  from dyngen.data import pipeline  # pylint: disable=g-import-not-at-top
  from dyngen.data import sources  # pylint: disable=g-import-not-at-top
  if os.path.isdir(data):
    config = pipeline.default_config("folder")
    config.folder = os.path.abspath(data)
  elif data in sources.DATASET_NAMES and data != "folder":
    config = pipeline.default_config(data)
  else:
    raise ValueError(f"--data={data!r} is neither a folder of class subfolders nor a dataset name of dyngen "
                     f"({[n for n in sources.DATASET_NAMES if n != 'folder']})")
  if sources.DATASET_CHANNELS[config.name] != 3:
    raise ValueError(f"--data={data!r} has {sources.DATASET_CHANNELS[config.name]}-channel images; the SD-VAE "
                     "encodes RGB images (3 channels)")
  config.data_dir = data_dir
  config.image_size = image_size
  config.read_threads = read_threads
  return config


@dataclasses.dataclass
class Progress:
  """Progress lines with images/s and ETA of this process (skipped shards count as done, not in the rate)."""
  total: int
  done: int = 0
  encoded: int = 0
  start: float = dataclasses.field(default_factory=time.perf_counter)
  last_line: float = 0.0

  def line(self, what: str) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.encoded / elapsed if elapsed > 0 else 0.0
    remaining = self.total - self.done
    eta = f"{remaining / rate / 60:.1f} min" if rate > 0 else ("0 min" if remaining == 0 else "unknown")
    percent = 100.0 * self.done / max(self.total, 1)
    return (f"{what}: {self.done}/{self.total} images of this process ({percent:.1f}%), "
            f"{rate:.2f} images/s, ETA {eta}")


def _make_encode_step(vae: autoencoder_lib.Autoencoder, mesh):
  """Jitted (params, uint8 images (B, S, S, 3)) -> mean, std, mean_flip, std_flip (B, h, w, C), data-parallel."""
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def step(params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0  # the pipeline's ScaleToSymmetricRange, on the device
    # Image i and its flip are rows 2i, 2i + 1: each device encodes the flips of its own images.
    both = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])
    mean, logvar = vae.encode_fn(params, both)
    mean = mean.astype(jnp.float32).reshape(x.shape[0], 2, *mean.shape[1:])
    std = jnp.exp(0.5 * logvar.astype(jnp.float32)).reshape(mean.shape)
    return mean[:, 0], std[:, 0], mean[:, 1], std[:, 1]

  return jax.jit(step, in_shardings=(replicated, data), out_shardings=data), replicated, data


def _check_metadata(path: str, metadata: dict):
  with open(path) as f:
    existing = json.load(f)
  differences = [f"{key}: {existing.get(key)!r} there, {value!r} now" for key, value in metadata.items()
                 if existing.get(key) != value]
  if differences:
    raise ValueError(f"{path} describes another extraction ({'; '.join(differences)}); rerun with the same "
                     "flags to resume it, or give another --output")


def _write_json_atomically(path: str, content: dict):
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w") as f:
    json.dump(content, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _num_records(path: str) -> int:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def extract_latents(data_config, vae: autoencoder_lib.Autoencoder, output_dir: str, *, vae_id: str = "",
                    split: str = "train", shard_size: int = 1024, batch_size: int = 32,
                    process_index: int | None = None, process_count: int | None = None,
                    log=print, log_every_s: float = 30.0) -> dict:
  """Writes this process's missing shards of `split` into `output_dir` (see the module docstring).

  Args:
    data_config: `config.data` of a 3-channel dataset (see `data_config_of`); its image_size is the crop.
    vae: the loaded autoencoder.
    vae_id: identifies the VAE weights in metadata.json (the command line uses the file's sha256), so that
      a rerun with other weights is refused instead of mixing latents.
    shard_size: images per shard (the unit of resumption); batch_size: images per device step (both
      with their flips), a multiple of the local device count.
    process_index, process_count: this host's share; default jax.process_index() / jax.process_count().
    log: called with each progress line.

  Returns:
    The metadata dict (also in output_dir/metadata.json).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from dyngen.data import sources  # pylint: disable=g-import-not-at-top
  from dyngen.data import transforms  # pylint: disable=g-import-not-at-top

  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  devices = jax.local_devices()
  if shard_size <= 0 or batch_size <= 0 or batch_size % len(devices):
    raise ValueError(f"shard_size={shard_size} must be > 0 and batch_size={batch_size} a positive multiple of "
                     f"the {len(devices)} local devices")
  image_size = sources.validate_image_size(data_config)
  if image_size % vae.downsample_factor:
    raise ValueError(f"image_size={image_size} must be a multiple of the VAE's downsampling factor "
                     f"{vae.downsample_factor}")
  source = sources.open_split(data_config, split)
  builder = sources.prepared_builder(data_config)
  num_examples = len(source)
  num_shards = -(-num_examples // shard_size)
  side = image_size // vae.downsample_factor
  metadata = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "data": {"name": data_config.name, "folder": data_config.get("folder", ""), "split": split},
      "image_size": image_size, "num_examples": num_examples, "shard_size": shard_size, "num_shards": num_shards,
      "latent_shape": [side, side, vae.config.latent_channels], "scale_factor": vae.scale_factor,
      "vae": dataclasses.asdict(vae.config), "vae_id": vae_id, "flips": True,
      "class_names": list(builder.info.features["label"].names),
  }
  # JSON turns tuples into lists: compare what a reread gives.
  metadata = json.loads(json.dumps(metadata))
  os.makedirs(output_dir, exist_ok=True)
  metadata_path = os.path.join(output_dir, METADATA_FILE)
  if os.path.exists(metadata_path):
    _check_metadata(metadata_path, metadata)
  else:
    _write_json_atomically(metadata_path, metadata)  # every host writes the same content

  mine = process_shards(num_shards, process_index, process_count)
  progress = Progress(total=sum(end - start for start, end in (shard_range(s, shard_size, num_examples) for s in mine)))
  todo = []
  for shard in mine:
    final = os.path.join(output_dir, shard_file_name(shard, num_shards))
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # a partial shard of a killed run
      os.remove(stale)
    start, end = shard_range(shard, shard_size, num_examples)
    if os.path.exists(final):
      if _num_records(final) != end - start:
        raise ValueError(f"{final} holds {_num_records(final)} records, expected {end - start}; delete it and rerun")
      progress.done += end - start
    else:
      todo.append(shard)
  log(progress.line(f"process {process_index}/{process_count}: {len(mine) - len(todo)} of {len(mine)} shards "
                    f"complete, {len(todo)} to write"))
  if not todo:
    return metadata

  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  encode_step, replicated, data_sharding = _make_encode_step(vae, mesh)
  params = jax.device_put(vae.params, replicated)
  decode = transforms.DecodeAndCenterCrop(image_size, 3)
  read_options = grain.ReadOptions(num_threads=data_config.get("read_threads", 8),
                                   prefetch_buffer_size=2 * batch_size)
  progress.start = time.perf_counter()
  for shard in todo:
    start, end = shard_range(shard, shard_size, num_examples)
    final = os.path.join(output_dir, shard_file_name(shard, num_shards))
    temporary = f"{final}.tmp-{os.getpid()}"
    images = iter(grain.MapDataset.source(source)[start:end].map(decode).to_iter_dataset(read_options))
    writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
    pending = None  # the batch on the devices while the host stacks the next one (jax dispatch is async)
    for first in range(start, end + batch_size, batch_size):
      submitted = None
      if first < end:
        examples = [next(images) for _ in range(min(batch_size, end - first))]
        batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)  # the last batch padded
        batch[:len(examples)] = np.stack([e["image"] for e in examples])
        submitted = (first, examples, encode_step(params, jax.device_put(batch, data_sharding)))
      if pending is not None:
        index, done, outputs = pending
        outputs = jax.device_get(outputs)
        for i, example in enumerate(done):
          writer.write(encode_record(*(o[i] for o in outputs), example["label"], index + i))
        progress.done += len(done)
        progress.encoded += len(done)
        now = time.perf_counter()
        if now - progress.last_line >= log_every_s:
          progress.last_line = now
          log(progress.line(f"shard {shard}/{num_shards}"))
      pending = submitted
    writer.close()
    with open(temporary, "rb") as f:
      os.fsync(f.fileno())
    os.replace(temporary, final)  # complete: from now on a rerun skips this shard
    log(progress.line(f"shard {shard}/{num_shards} done"))
  return metadata


FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a program, so importing this module adds none)."""
  flags.DEFINE_string("data", None, "tfds dataset name (imagenet2012) or a folder of class subfolders of images.")
  flags.DEFINE_string("vae", None, "diffusers AutoencoderKL weights: a .safetensors / .bin file or its folder.")
  flags.DEFINE_string("output", None, "Folder of the latent shards (created; a rerun resumes it).")
  flags.DEFINE_integer("image_size", 256, "Side of the ADM centre crop in pixels (latents are image_size / 8).")
  flags.DEFINE_string("split", "train", "Split to extract (imagenet2012: train or validation; folder: train).")
  flags.DEFINE_string("data_dir", "", "tfds data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets).")
  flags.DEFINE_integer("shard_size", 1024, "Images per shard (the unit of resumption).")
  flags.DEFINE_integer("batch_size", 32, "Images per step over all local devices (each with its flip).")
  flags.DEFINE_integer("read_threads", 8, "Threads decoding and cropping images.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype (latents are stored as float32).")
  flags.DEFINE_string("precision", "", "XLA precision of the VAE's convs and matmuls ('' = backend default, "
                      "'highest' = float32-exact on TPU/GPU).")
  flags.DEFINE_integer("process_index", -1, "This process's index (-1: jax.process_index()).")
  flags.DEFINE_integer("process_count", -1, "Number of processes sharing the work (-1: jax.process_count()).")
  flags.DEFINE_bool("distributed", False,
                    "Call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters).")
  flags.DEFINE_float("log_every_s", 30.0, "Seconds between progress lines (one line per finished shard as well).")


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  for name in ("data", "vae", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if FLAGS.distributed:
    jax.distributed.initialize()
  if jax.default_backend() != "cpu":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")  # should tfds pull in TensorFlow, it must not claim the GPUs
  from dyngen.latent import weights  # pylint: disable=g-import-not-at-top

  weights_path = weights.resolve_weights_path(FLAGS.vae)
  vae = weights.load_autoencoder(weights_path, dtype=jnp.dtype(FLAGS.dtype), precision=FLAGS.precision or None)
  data_config = data_config_of(FLAGS.data, FLAGS.image_size, FLAGS.data_dir, FLAGS.read_threads)

  def log(line):
    print(line, flush=True)  # stdout, one line per event (absl logging would add its prefix and stderr)

  log(f"VAE {weights_path}: {vae}; {jax.local_device_count()} local {jax.default_backend()} device(s)")
  extract_latents(data_config, vae, FLAGS.output,
                  vae_id=f"sha256:{file_sha256(weights_path)}", split=FLAGS.split, shard_size=FLAGS.shard_size,
                  batch_size=FLAGS.batch_size,
                  process_index=None if FLAGS.process_index < 0 else FLAGS.process_index,
                  process_count=None if FLAGS.process_count < 0 else FLAGS.process_count,
                  log=log, log_every_s=FLAGS.log_every_s)
  log(f"process {jax.process_index() if FLAGS.process_index < 0 else FLAGS.process_index}: all its shards of "
      f"{FLAGS.output} are complete")


if __name__ == "__main__":
  from dyngen import cli_errors  # pylint: disable=g-import-not-at-top
  define_flags()
  jax.config.config_with_absl()
  cli_errors.run(main)
