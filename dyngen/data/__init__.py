"""Input data: tfds datasets (embedded digits, ImageNet, image folders) read with grain.

Public API:
  default_config(name) -> config.data ConfigDict
  create_input_pipeline(data_config, *, global_batch_size, seed, ...) -> checkpointable grain iterator
  dataset_info(data_config) -> DatasetInfo(image_shape, num_classes, num_examples, class_names)
  load_split_arrays(data_config, split) -> (images (N, H, W, C) in [-1, 1], labels (N,))
  center_crop_adm(pil_image, image_size) -> uint8 array
"""
from dyngen.data.pipeline import create_input_pipeline
from dyngen.data.pipeline import default_config
from dyngen.data.pipeline import load_split_arrays
from dyngen.data.sources import DatasetInfo
from dyngen.data.sources import dataset_info
from dyngen.data.transforms import center_crop_adm
