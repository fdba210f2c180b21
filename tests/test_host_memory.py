"""dyngen.host_memory: the restart with glibc's huge-page tunable, its conditions, and its real effect."""
import os
import re
import subprocess
import sys

import pytest

from dyngen import host_memory

PLAIN = {"PATH": os.environ.get("PATH", "")}


class TestWhetherToRestart:

  def test_restarts_where_glibc_and_the_kernel_support_it(self):
    assert host_memory.restart_needed(PLAIN, glibc=(2, 36), thp="madvise") is not None
    assert host_memory.restart_needed(PLAIN, glibc=(2, 35), thp="always") is not None

  @pytest.mark.parametrize("glibc, thp", [(None, "madvise"), ((2, 34), "madvise"), ((2, 36), "never"),
                                          ((2, 36), None)])
  def test_not_without_support(self, glibc, thp):
    assert host_memory.restart_needed(PLAIN, glibc=glibc, thp=thp) is None

  def test_the_users_setting_wins_even_when_it_is_off(self):
    for value in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"):
      assert host_memory.restart_needed({"GLIBC_TUNABLES": value}, glibc=(2, 36), thp="madvise") is None

  def test_never_twice(self):
    environ = {host_memory._RESTARTED_MARK: "1"}  # As glibc leaves it when it drops GLIBC_TUNABLES.
    assert host_memory.restart_needed(environ, glibc=(2, 36), thp="madvise") is None

  def test_keeps_the_users_other_tunables(self):
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"}
    merged = host_memory.with_tunable(environ)
    assert merged == "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert host_memory.tunables_named({"GLIBC_TUNABLES": merged}) == {
        "glibc.malloc.arena_max": "2", "glibc.malloc.tcache_count": "0", "glibc.malloc.hugetlb": "1"}
    assert host_memory.with_tunable({}) == "glibc.malloc.hugetlb=1"


def run_module(environ):
  """`python -m dyngen.host_memory` (it restarts itself as dyngen.main does) -> (GLIBC_TUNABLES, faults)."""
  environ = dict(environ, PYTHONPATH=os.pathsep.join(sys.path))
  out = subprocess.run([sys.executable, "-m", "dyngen.host_memory"], env=environ, capture_output=True,
                       text=True, timeout=60, check=True).stdout
  tunables = re.search(r"GLIBC_TUNABLES='([^']*)'", out).group(1)
  faults = int(re.search(r"page faults writing a fresh 256 MiB block: (\d+)", out).group(1))
  return tunables, faults


@pytest.mark.skipif(host_memory.restart_needed(PLAIN) is None,
                    reason="this host's glibc or kernel offers no transparent huge pages to malloc")
class TestTheRestartItself:

  def test_restarts_once_and_faults_far_less(self):
    tunables, faults = run_module(PLAIN)
    assert tunables == "glibc.malloc.hugetlb=1"
    _, default_faults = run_module(dict(PLAIN, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
    # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages 128, plus the unaligned ends of the block.
    assert default_faults >= 65536 * 0.9
    assert faults < default_faults / 20

  def test_status_line_says_what_applies(self):
    assert "hugetlb=1 (transparent huge pages)" in host_memory.status({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert "start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in host_memory.status(PLAIN)
