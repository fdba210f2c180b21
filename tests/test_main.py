"""`python -m dyngen.main` as a user runs it: flag errors (the quickstart end to end, resumed and sampling:
tests/test_snippets.py runs the README's command)."""
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "dyngen.main", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.lr=1e-3", "lr"),
    ("--config.batch_size=many", "batch_size"),
    # Parsed as a tuple, then checked against the devices before anything is built.
    ("--config.mesh.shape=(2,1,1)", "needs 2 devices but 1 are available"),
])
def test_bad_override_stops_before_running(tmp_path, override, message):
  result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", override)
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_mode_is_refused(tmp_path):
  result = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--mode=serve")
  assert result.returncode != 0 and "--mode" in result.stderr
