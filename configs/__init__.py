"""dyngen's experiment configs, installed with the package as `dyngen.configs` (setup.py maps this folder).

Each file is an ml_collections config file: `get_config(arg)` returns the run's ConfigDict, and it imports
only dyngen and ml_collections, so it loads from any directory:

  python -m dyngen.main --config=configs/dit_xl.py:XL/2 --workdir=DIR          # from a checkout
  python -m dyngen.main --config=/abs/path/configs/dit_xl.py:XL/2 --workdir=DIR
  python -m dyngen.main --config="$(python -m dyngen.configs dit_xl)":XL/2 --workdir=DIR  # after pip install

and in Python (a notebook after `pip install`):

  import dyngen.configs
  config = dyngen.configs.get("dit_xl", "XL/2")   # = configs/dit_xl.py's get_config("XL/2")
"""
import importlib
import pathlib

_DIRECTORY = pathlib.Path(__file__).parent


def names() -> list[str]:
  """The shipped experiment configs ("dit_xl", "quickstart", ...), sorted."""
  return sorted(path.stem for path in _DIRECTORY.glob("*.py") if not path.stem.startswith("_"))


def path(name: str) -> str:
  """The file of config `name`, for `--config=<path>[:arg]`.

  Raises:
    ValueError: naming `name` and the configs that exist, when there is no such config.
  """
  if name not in names():
    raise ValueError(f"no experiment config named {name!r}; dyngen ships {names()}.")
  return str(_DIRECTORY / f"{name}.py")


def get(name: str, arg: str | None = None):
  """The ConfigDict of config `name` with argument `arg` (the text after ':' in --config=<file>:<arg>)."""
  path(name)  # The clear error for an unknown name.
  return importlib.import_module(f"{__name__}.{name}").get_config(arg)
