"""Compiles a kernel source of this package for the host CPU once, caches the library, registers its handlers.

The library is built with `-march=native` for the machine that runs it, so the cache key holds the CPU's
feature flags beside the source, the compiler and jaxlib (whose FFI headers it compiles against): a cache
directory shared between different machines (an NFS home) keeps one library per kind of CPU. Builds write to a
temporary file and rename it into place, so processes that build at the same time do not see half a library.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jaxlib

SOURCE_DIR = pathlib.Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden")
CACHE_ENV = "DYNGEN_CACHE_DIR"  # default: $XDG_CACHE_HOME/dyngen, else ~/.cache/dyngen


class BuildError(RuntimeError):
  """The kernel library could not be built or loaded on this host."""


def cache_dir():
  root = os.environ.get(CACHE_ENV)
  if not root:
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dyngen")
  return pathlib.Path(root) / "cpu_kernels"


def _compiler():
  name = os.environ.get("CXX", "g++")
  path = shutil.which(name) or shutil.which("c++")
  if path is None:
    raise BuildError(f"no C++ compiler: neither $CXX ({name}) nor c++ is on PATH")
  return path


def _cpu_features():
  """The host's CPU feature flags (what -march=native compiles for)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cache_key(source, compiler):
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  digest = hashlib.sha256()
  for part in (source.read_bytes(), version.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
               _cpu_features().encode()):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:16]


def library_path(name):
  """The built library for `name`.cc, compiling it first when this host has none cached."""
  if platform.system() != "Linux":
    raise BuildError(f"the CPU kernels are built for Linux only, not {platform.system()}")
  source = SOURCE_DIR / f"{name}.cc"
  compiler = _compiler()
  target = cache_dir() / f"{name}-{_cache_key(source, compiler)}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  logging.info("Building dyngen's CPU %s kernel for this host into %s (once; a few seconds).", name, target)
  fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", scratch]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise BuildError(f"compiling {source.name} failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    os.replace(scratch, target)
  finally:
    if os.path.exists(scratch):
      os.remove(scratch)
  return target


@functools.cache
def load(name, handlers):
  """Builds (when needed) and loads `name`.cc, and registers each of `handlers` — pairs of (FFI target name,
  exported symbol) — for XLA:CPU. Raises BuildError on any failure, with the reason."""
  path = library_path(name)
  try:
    library = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    raise BuildError(f"loading {path} failed ({e}); delete it to have it built again") from e
  for target, symbol in handlers:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return library
