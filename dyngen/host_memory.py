"""Host memory that XLA:CPU does not fault in again on every step: glibc malloc with transparent huge pages.

Each XLA:CPU execution allocates its temporaries and frees them when it ends (a DiT-S/2 train step: 1.2 GiB
at batch 8, 5.2 GiB at batch 32). glibc serves blocks that large with mmap and unmaps them on free, so on
every step the kernel faults the same memory in again, 4 KiB at a time, zeroing each page: 1.4 M page faults
per batch-32 step. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for
transparent huge pages (madvise), and the memory then arrives in 2 MiB pages: 512 times fewer faults
(docs/host_memory.md has the measurements).

glibc reads its tunables once, when the process starts, so they cannot be switched on from Python;
`dyngen.main` calls `reexec_with_tunables()` before anything else, which restarts the same command line
once with the tunable added to GLIBC_TUNABLES. It does nothing when GLIBC_TUNABLES already names the tunable
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps glibc's default), off Linux or glibc, on glibc < 2.35, or when
the kernel's transparent huge pages are off. On TPU and GPU hosts it changes only host-side malloc (the input
pipeline, checkpoint buffers); device memory does not come from malloc. Where dyngen is imported into an
already running Python (a notebook), set the variable before starting it; `status()` says what applies.
"""
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
VALUE = "1"  # madvise(MADV_HUGEPAGE) on malloc's memory; 2 would need hugetlbfs pages reserved by the admin.
MIN_GLIBC = (2, 35)  # The release that added glibc.malloc.hugetlb; older ones ignore unknown tunables.
THP_SETTING_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the restarted process so that it never restarts again, even where glibc drops GLIBC_TUNABLES
# (setuid programs).
_RESTARTED_MARK = "DYNGEN_HOST_MEMORY_RESTARTED"


def glibc_version():
  """(major, minor) of the running glibc, or None (not Linux, or another C library)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def transparent_huge_pages():
  """The kernel's THP mode ("always", "madvise", "never"), or None where the kernel has no THP."""
  try:
    with open(THP_SETTING_FILE) as f:
      text = f.read()
  except OSError:
    return None
  # The file lists every mode and brackets the one in force: "always [madvise] never".
  chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
  return chosen[0] if chosen else None


def tunables_named(environ):
  """{name: value} of GLIBC_TUNABLES (colon-separated name=value pairs)."""
  pairs = [item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item]
  return dict(pairs)


def with_tunable(environ):
  """GLIBC_TUNABLES of `environ` with the tunable added (the user's own entries kept, in their order)."""
  existing = environ.get("GLIBC_TUNABLES", "")
  return f"{existing}:{TUNABLE}={VALUE}" if existing else f"{TUNABLE}={VALUE}"


def restart_needed(environ, glibc="running", thp="running"):
  """Why the process would gain from a restart with the tunable, or None when it would not.

  glibc, thp: what `glibc_version()` and `transparent_huge_pages()` return, read from this host by default.
  """
  glibc = glibc_version() if glibc == "running" else glibc
  thp = transparent_huge_pages() if thp == "running" else thp
  if environ.get(_RESTARTED_MARK) or TUNABLE in tunables_named(environ):
    return None
  if glibc is None or glibc < MIN_GLIBC or thp in (None, "never"):
    return None
  return f"glibc {glibc[0]}.{glibc[1]}, transparent huge pages {thp!r}"


def reexec_with_tunables():
  """Restarts this process's command line once with the tunable in GLIBC_TUNABLES, where it helps.

  Call it first thing in an entry point: everything done before it is done twice. Returns only when no
  restart is needed (os.execve does not return).
  """
  if restart_needed(os.environ) is None:
    return
  environ = dict(os.environ, GLIBC_TUNABLES=with_tunable(os.environ), **{_RESTARTED_MARK: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the command line as given, interpreter options and `-m module` included.
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)


def status(environ=None):
  """One line for the run's log: whether malloc gets huge pages in this process, and why not."""
  environ = os.environ if environ is None else environ
  setting = tunables_named(environ).get(TUNABLE)
  if setting is not None:
    return f"glibc malloc with {TUNABLE}={setting}" + (" (transparent huge pages)" if setting == "1" else "")
  reason = restart_needed(environ)
  if reason is None:
    return "glibc malloc defaults (huge pages unavailable here)"
  return (f"glibc malloc defaults: start Python with GLIBC_TUNABLES={TUNABLE}={VALUE} for fewer page faults "
          "(docs/host_memory.md)")


def faults_touching(num_bytes):
  """Minor page faults of malloc'ing `num_bytes`, writing every byte and freeing it (what one XLA:CPU
  execution does with its temporaries)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(num_bytes)
  if not block:
    raise MemoryError(f"malloc({num_bytes}) failed")
  ctypes.memset(block, 1, num_bytes)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
  return faults


def main():
  """`python -m dyngen.host_memory`: what dyngen.main does with host memory here, shown on a 256 MiB block."""
  reexec_with_tunables()
  size = 256 * 2**20
  glibc = glibc_version()
  print(f"glibc {'.'.join(map(str, glibc)) if glibc else 'absent'}; transparent huge pages: "
        f"{transparent_huge_pages()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  print(f"host memory: {status()}")
  print(f"page faults writing a fresh {size >> 20} MiB block: {faults_touching(size)} "
        f"(4 KiB pages: {size // 4096}; 2 MiB pages: {size // 2**21})")


if __name__ == "__main__":
  main()
