"""Any folder of class subfolders of images, built into an array_record tfds dataset.

Layout: `root/<class_name>/<any name>.{png,jpg,jpeg,bmp,webp,gif}`. Class names are sorted (Python
string order) and numbered 0..K-1. All images form the split "train", stored in order (classes, then file names, sorted). The encoded files are stored as
they are (no re-encoding); the pipeline decodes them with PIL and applies the ADM centre crop.

The dataset lands in `data_dir/dyngen_folder/<folder name>_<hash>/1.0.0/`, where the hash covers the
absolute path of the folder and the list of image files: adding, removing or renaming an image makes a
new dataset on the next use (the old one can be deleted by hand).
"""
import dataclasses
import hashlib
import os
import re

from PIL import Image
import tensorflow_datasets as tfds

from dyngen import progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def list_class_images(root: str) -> dict[str, list[str]]:
  """{class name: sorted image paths relative to `root`} for `root/<class>/<image>`; classes sorted.

  Raises:
    FileNotFoundError: `root` is missing, or has no class subfolder holding an image.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"data.folder={root!r} is not a directory. Point it to a folder laid out as "
        "<folder>/<class_name>/<image>.png|jpg (one subfolder per class).")
  classes = {}
  for class_name in sorted(os.listdir(root)):
    class_dir = os.path.join(root, class_name)
    if not os.path.isdir(class_dir):
      continue
    images = sorted(
        os.path.join(class_name, name) for name in os.listdir(class_dir)
        if name.lower().endswith(IMAGE_EXTENSIONS))
    if images:
      classes[class_name] = images
  if not classes:
    raise FileNotFoundError(
        f"data.folder={root!r} has no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)}). "
        "Expected <folder>/<class_name>/<image>, e.g. <folder>/cat/001.jpg.")
  return classes


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Which folder to build; `name` identifies the folder and its file list (see `folder_config`)."""

  folder: str = ""
  class_names: tuple[str, ...] = ()


def folder_config(root: str) -> FolderConfig:
  """The builder config of the folder `root`, named `<basename>_<hash of path and file list>`."""
  root = os.path.abspath(root)
  classes = list_class_images(root)
  fingerprint = hashlib.sha256(root.encode())
  for class_name, images in classes.items():
    fingerprint.update("\0".join([class_name, *images]).encode())
  basename = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(root).lower()).strip("_") or "folder"
  return FolderConfig(
      name=f"{basename}_{fingerprint.hexdigest()[:12]}",
      version=DyngenFolder.VERSION,
      description=f"Images of {root}",
      folder=root,
      class_names=tuple(classes),
  )


class DyngenFolder(tfds.core.GeneratorBasedBuilder):
  """Images in class subfolders; one split, "train". Build with `DyngenFolder(config=folder_config(root))`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded images stored as found, labels from sorted subfolder names."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # The stored bytes are the original files; shape/format are not checked by tfds, PIL decodes.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(self.builder_config.class_names)),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # Stored in generation order, so a split's index i is a known example.
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    root = self.builder_config.folder
    classes = list_class_images(root)
    if tuple(classes) != self.builder_config.class_names:
      raise RuntimeError(f"The classes of {root} changed while building; build again.")
    # Built once, on first use; an ImageNet-sized folder takes a while: a line every 30 s.
    meter = progress.Meter(f"Building the dataset of {root}", total=sum(map(len, classes.values())),
                           unit="images", min_seconds=30.0)
    done = 0
    for label, (class_name, images) in enumerate(classes.items()):
      for relative_path in images:
        path = os.path.join(root, relative_path)
        try:
          with Image.open(path) as image:
            image.verify()  # Reads the header only; a broken file stops the build here, named.
        except Exception as error:  # pylint: disable=broad-exception-caught
          raise ValueError(f"{path} is not a readable image ({error}); remove or fix it.") from error
        with open(path, "rb") as f:
          encoded = f.read()
        yield relative_path, {"image": encoded, "label": label, "file_name": relative_path}
        done += 1
        meter.update(done)
