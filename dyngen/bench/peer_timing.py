"""How both workers of `python -m dyngen.bench.peer` time a measurement: standard library only, so that the
PyTorch worker, which runs in a Python without dyngen's dependencies, loads this file by its path."""
import resource
import time


def timed(fn, warmup, repeats):
  """Runs fn warmup + repeats times; per timed run: wall, process CPU, kernel CPU seconds and minor faults."""
  times = {"wall_s": [], "cpu_s": [], "sys_s": [], "minor_faults": []}
  for i in range(warmup + repeats):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    if i >= warmup:
      times["wall_s"].append(wall)
      times["cpu_s"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
      times["sys_s"].append(after.ru_stime - before.ru_stime)
      times["minor_faults"].append(after.ru_minflt - before.ru_minflt)
  return times
