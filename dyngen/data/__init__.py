"""Input data: tfds datasets (embedded digits, ImageNet, image folders) and extracted SD-VAE latents, read
with grain.

Public API (each dispatches on `data_config.name`; "latents" is dyngen.data.latents):
  default_config(name) -> config.data ConfigDict
  create_input_pipeline(data_config, *, global_batch_size, seed, ...) -> checkpointable grain iterator
    (pixels: {"image", "label"}; latents: {"mean", "std", "label"}, the posterior drawn in the train step)
  dataset_info(data_config) -> DatasetInfo(image_shape, num_classes, num_examples, class_names)
  load_split_arrays(data_config, split) -> (images (N, H, W, C) in [-1, 1], labels (N,))
  center_crop_adm(pil_image, image_size) -> uint8 array
"""
from dyngen.data import latents
from dyngen.data import pipeline
from dyngen.data import sources
from dyngen.data.pipeline import load_split_arrays
from dyngen.data.sources import DatasetInfo
from dyngen.data.transforms import center_crop_adm

LATENTS = "latents"


def default_config(name: str = "digits"):
  return latents.default_config() if name == LATENTS else pipeline.default_config(name)


def create_input_pipeline(data_config, **kwargs):
  if data_config.name == LATENTS:
    return latents.create_latent_pipeline(data_config, **kwargs)
  return pipeline.create_input_pipeline(data_config, **kwargs)


def dataset_info(data_config) -> sources.DatasetInfo:
  return latents.latent_info(data_config) if data_config.name == LATENTS else sources.dataset_info(data_config)
