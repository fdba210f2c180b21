"""Which tfds dataset a data config names, prepared and opened as an array_record data source.

`config.data.name` is one of:
- "digits": the embedded 8x8 digits (`dyngen.data.digits`), built into `data_dir` on first use.
- "imagenet2012": tfds `imagenet2012`, which must already be prepared in `data_dir` in array_record format
  (it needs the manually downloaded ILSVRC2012 tars; see `_imagenet_not_prepared_message`).
- "folder": `config.data.folder`, a folder of class subfolders of images, built on first use
  (`dyngen.data.folder`).
"""
import dataclasses
import os

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from dyngen.data import digits as digits_lib
from dyngen.data import folder as folder_lib

DATASET_NAMES = ("digits", "imagenet2012", "folder")
# Channels of the images the pipeline yields; folder images are converted to RGB.
DATASET_CHANNELS = {"digits": 1, "imagenet2012": 3, "folder": 3}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a dataset before it sees a batch.

  Attributes:
    name: the `config.data.name`.
    image_shape: (H, W, C) of the images the pipeline yields (H = W = `config.data.image_size`).
    num_classes: K; labels are 0..K-1 (K itself is the null class of classifier-free guidance).
    num_examples: {split name: number of examples}.
    class_names: name of every label id.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_examples: dict[str, int]
  class_names: tuple[str, ...]

  @property
  def num_train_examples(self) -> int:
    return self.num_examples["train"]


def resolve_data_dir(data_config) -> str:
  """`config.data.data_dir`, or tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets) when empty."""
  data_dir = data_config.get("data_dir") or tfds.core.constants.get_default_data_dir()
  return os.path.expanduser(data_dir)


def _imagenet_not_prepared_message(data_dir: str, problem: str) -> str:
  return (
      f"{problem}\nTo prepare it: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
      f"https://image-net.org/download-images) into {os.path.join(data_dir, 'downloads', 'manual')} and run\n"
      f"  tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record\n"
      f"or convert an existing TFRecord build with\n"
      f"  tfds convert_format --dataset_dir={os.path.join(data_dir, 'imagenet2012')} "
      f"--out_file_format=array_record\n"
      "or set config.data.data_dir to the directory that holds the prepared imagenet2012.")


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The tfds builder of `data_config.name`, prepared in array_record format (built first if embedded)."""
  name = data_config.name
  data_dir = resolve_data_dir(data_config)
  if name == "digits":
    builder = digits_lib.DyngenDigits(data_dir=data_dir, file_format="array_record")
  elif name == "folder":
    folder = data_config.get("folder")
    if not folder:
      raise ValueError('config.data.folder must name a folder of class subfolders when data.name="folder".')
    builder = folder_lib.DyngenFolder(config=folder_lib.folder_config(folder), data_dir=data_dir,
                                      file_format="array_record")
  elif name == "imagenet2012":
    # Read from the prepared files: no builder code (whose import pulls in tensorflow) is needed.
    try:
      builder = read_only_builder.builder_from_files("imagenet2012", data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as error:
      raise FileNotFoundError(_imagenet_not_prepared_message(
          data_dir, f"imagenet2012 is not prepared in data_dir={data_dir}.")) from error
    formats = [builder.info.file_format, *builder.info.alternative_file_formats]
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      raise FileNotFoundError(_imagenet_not_prepared_message(
          data_dir, f"imagenet2012 in {data_dir} is stored as {[f.value for f in formats if f]}, "
          "but the grain pipeline reads array_record (random access)."))
    return builder
  else:
    raise ValueError(f"config.data.name={name!r} is not a dataset of dyngen; use one of {DATASET_NAMES}.")
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def open_split(data_config, split: str):
  """The random-access source of `split`: records {"image": encoded bytes, "label": int, ...}."""
  builder = prepared_builder(data_config)
  if split not in builder.info.splits:
    raise ValueError(f"split={split!r} is not a split of {data_config.name}; it has {list(builder.info.splits)}.")
  return builder.as_data_source(
      split=split, decoders={"image": tfds.decode.SkipDecoding()},
      file_format=tfds.core.FileFormat.ARRAY_RECORD)


def dataset_info(data_config) -> DatasetInfo:
  """Image shape, classes and split sizes of the dataset `data_config` names (prepares it if embedded)."""
  image_size = validate_image_size(data_config)
  builder = prepared_builder(data_config)
  label = builder.info.features["label"]
  return DatasetInfo(
      name=data_config.name,
      image_shape=(image_size, image_size, DATASET_CHANNELS[data_config.name]),
      num_classes=label.num_classes,
      num_examples={split: info.num_examples for split, info in builder.info.splits.items()},
      class_names=tuple(label.names),
  )


def validate_image_size(data_config) -> int:
  image_size = data_config.image_size
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"config.data.image_size must be a positive int (pixels), got {image_size!r}.")
  return image_size
