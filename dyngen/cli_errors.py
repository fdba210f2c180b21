"""User errors on dyngen's command lines: one `error: <message>` line on stderr and exit status 2, no traceback.

  from dyngen import cli_errors
  if __name__ == "__main__":
    cli_errors.run(main)          # instead of absl.app.run(main)

What counts as a user error (everything else is an internal error and keeps its traceback):
- flag problems: an unknown flag or config field (with the closest field suggested), a value of the wrong type, a
  missing required flag, a config file that cannot be loaded or whose `get_config(arg)` refuses its argument,
  `app.UsageError`;
- exceptions of the classes in `USER_ERROR_CLASSES` (bad checkpoints, torch files that do not fit, a diverged run),
  wherever raised;
- ValueError and OSError (FileNotFoundError, FileExistsError, ...) raised by dyngen's own code (the innermost
  frame is in a `dyngen` module): the project's checks of config values, data, paths and
  arrays. The same types raised inside a library (jax, orbax, numpy) may be dyngen's bug and keep the traceback.
Set DYNGEN_TRACEBACK=1 to see the traceback of a user error as well.

`--help` (and `--helpshort`, `--helpfull`, `-h`) print the flags and exit 0 (absl exits 1).
"""
import difflib
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as config_flag_lib

EXIT_USER_ERROR = 2

# Qualified names (module.class), matched against the exception's whole MRO, so that this module imports none of
# them (dyngen.checkpoint pulls in Orbax, the trainer TensorFlow) and subclasses count too.
USER_ERROR_CLASSES = frozenset({
    "dyngen.checkpoint.CorruptCheckpointError",
    "dyngen.checkpoint.CheckpointMismatchError",
    "dyngen.convert.param_mapping.ParamMappingError",
    "dyngen.convert.torch_checkpoint.CheckpointFormatError",
    "dyngen.convert.torch_checkpoint.UnsafeCheckpointError",
    "dyngen.train.trainer.NonFiniteLossError",
    "absl.app.UsageError",
})
_OWN_PACKAGES = ("dyngen",)
_OWN_ROOTS = tuple(pathlib.Path(__file__).resolve().parents[1] / name for name in _OWN_PACKAGES)
_HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml", "-helpxml",
               "-?", "-h")


class UserError(ValueError):
  """A problem with the user's flags, config, data or files, stated in the message; no traceback is shown."""


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is the user's (see the module docstring) rather than an internal one."""
  if isinstance(error, UserError):
    return True
  if any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERROR_CLASSES for cls in type(error).__mro__):
    return True
  if not isinstance(error, (ValueError, OSError)):
    return False
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  module = tb.tb_frame.f_globals.get("__name__", "")
  if module.split(".")[0] in _OWN_PACKAGES:
    return True
  # A module run with `python -m dyngen.x` is named __main__: recognise it by its file.
  path = pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()
  return any(root in path.parents for root in _OWN_ROOTS)


def one_line(message: str) -> str:
  """`message` with its lines joined by '; ' (absl and ml_collections put several errors on separate lines)."""
  return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def exit_with_error(message: str) -> None:
  """Prints `error: <message>` on stderr and exits with status 2."""
  sys.stderr.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def error_message(error: BaseException) -> str:
  """The message of a user error: one line, except a list (the tensors that do not fit a model) stays a list."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    return f"{error.strerror}: {error.filename}"
  message = str(error)
  return message if "\n  " in message else one_line(message)


# Config field errors.


def _config_flags(flag_values) -> list[str]:
  return [name for name in flag_values if config_flag_lib.is_config_flag(flag_values[name])]


def _flag_value_in_argv(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
    match = re.fullmatch(rf"--?{re.escape(name)}=(.*)", arg, re.DOTALL)
    if match:
      return match.group(1)
  return None


def _overrides_in_argv(argv: Sequence[str], name: str) -> list[str]:
  """Field paths of `--name.a.b=...`, `--name.a.b value` and `--noname.a` in argv, in order."""
  paths = []
  for arg in argv:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      paths.append(match.group(1))
  return paths


def _field_problem(config, path: str) -> str | None:
  """Why the field `path` (dotted) does not exist in `config`, with the closest name; None if it exists."""
  node = config
  parts = path.split(".")
  for depth, part in enumerate(parts):
    parent = ".".join(parts[:depth])
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      kind = type(node).__name__
      return f"config field '{parent}' is {_with_article(kind)}, not a section: it has no field '{part}'"
    if part in node:
      node = node[part]
      continue
    known = sorted(str(key) for key in node)
    close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
    field = ".".join(parts[:depth + 1])
    if close:
      suggestion = ".".join(parts[:depth] + [close[0]])
      return f"unknown config field '{field}'; did you mean '{suggestion}'?"
    where = f"config.{parent}" if parent else "the config"
    return (f"unknown config field '{field}'; {where} has {', '.join(known)} (every field: "
            "docs/config_reference.md)")
  return None


def _unknown_field_message(argv: Sequence[str], flag_values) -> str | None:
  """The message for the first override in argv that names no field of its config, or None if none does."""
  for name in _config_flags(flag_values):
    overrides = _overrides_in_argv(argv, name)
    path = _flag_value_in_argv(argv, name)
    if not overrides or path is None:
      continue
    try:
      config = flag_values[name].parser.parse(path)
    except Exception:  # pylint: disable=broad-except
      return None  # The config itself does not load: the original error says why.
    for override in overrides:
      problem = _field_problem(config, override)
      if problem:
        return problem
  return None


_BAD_VALUE = re.compile(r"flag --(?P<flag>[\w.-]+)=(?P<value>.*?): (?P<reason>.*)", re.DOTALL)
_REQUIRED = re.compile(r"Flag --([\w.-]+) must have a value other than None")


def _with_article(word: str) -> str:
  return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _wrong_type_message(argv: Sequence[str], flag_values, flag: str, value: str, reason: str) -> str | None:
  """`config field 'batch_size' must be an int, got 'many'` for a config override of the wrong type."""
  name, _, path = flag.partition(".")
  if name not in _config_flags(flag_values) or not path:
    return None
  config_path = _flag_value_in_argv(argv, name)
  try:
    config = flag_values[name].parser.parse(config_path)
    for part in path.split("."):
      config = config[part]
  except Exception:  # pylint: disable=broad-except
    return None
  kind = type(config).__name__
  if isinstance(config, bool):  # absl's reason is a tuple repr here; the accepted spellings say more.
    return f"config field '{path}' must be a bool (true/false, 1/0), got {value!r}"
  return f"config field '{path}' must be {_with_article(kind)}, got {value!r} ({one_line(reason)})"


def _flags_error_message(error: flags.Error, argv: Sequence[str], flag_values) -> str:
  """absl's flag error as one line: config loader tracebacks reduced to their message, types named."""
  message = str(error)
  required = _REQUIRED.findall(message)
  if required:
    names = " and ".join(f"--{name}" for name in required)
    return f"{names} {'is' if len(required) == 1 else 'are'} required (see --help)"
  match = _BAD_VALUE.match(message)
  if "Error whilst parsing config file" in message:
    # ml_collections puts the whole traceback of get_config's error into the message: keep its final line.
    last = [line for line in message.splitlines() if line.strip()][-1].strip()
    reason = re.match(r"(?:\w+\.)*\w+(?:Error|Exception): (.*)", last)
    where = f"--{match.group('flag')}={match.group('value')}: " if match else ""
    return f"{where}{reason.group(1) if reason else last}"
  if match:
    typed = _wrong_type_message(argv, flag_values, match.group("flag"), match.group("value"), match.group("reason"))
    if typed:
      return typed
  return one_line(message)


def _check_configs_loaded(argv: Sequence[str], flag_values) -> None:
  """ml_collections defers a config file's load error to the first use of the config: report it now."""
  for name in _config_flags(flag_values):
    try:
      getattr(flag_values[name].value, "keys", None)
    except OSError as error:
      last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
      reason = re.sub(r"^\[Errno \d+\] ", "", last)
      exit_with_error(f"--{name}={_flag_value_in_argv(argv, name)}: cannot load the config file: {reason}")


def parse_flags(argv: Sequence[str], flag_values=flags.FLAGS) -> list[str]:
  """A `flags_parser` for `app.run`: parses argv; help exits 0, bad flags exit 2 with one `error:` line."""
  argv = ["--help" if arg == "-h" else arg for arg in argv]
  wants_help = any(arg in _HELP_FLAGS for arg in argv[1:])
  try:
    remaining = flag_values(argv)
  except SystemExit as stop:
    # absl's help flags print the help and exit 1; asking for help is not a failure.
    if wants_help and stop.code == 1:
      sys.exit(0)
    raise
  except flags.Error as error:
    exit_with_error(_unknown_field_message(argv, flag_values) or _flags_error_message(error, argv, flag_values))
  except (AttributeError, KeyError) as error:
    # ml_collections raises these (not a flags.Error) for an override naming no field of the config.
    message = _unknown_field_message(argv, flag_values)
    if message is None:
      raise
    del error
    exit_with_error(message)
  _check_configs_loaded(argv, flag_values)
  return remaining


def guard_user_errors(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """`main` with user errors turned into one `error:` line and exit status 2 (internal errors propagate)."""

  def guarded(argv):
    try:
      return main(argv)
    except Exception as error:  # pylint: disable=broad-except
      if not is_user_error(error) or os.environ.get("DYNGEN_TRACEBACK"):
        raise
      exit_with_error(error_message(error))
    return None

  return guarded


def run(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` with dyngen's flag parser and user-error handling."""
  app.run(guard_user_errors(main), flags_parser=parse_flags)
