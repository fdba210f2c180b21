"""`python -m dyngen.main` as a user runs it: flag errors, and the quickstart's smoke run end to end."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dyngen import host_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=900, env=None):
  return subprocess.run([sys.executable, "-m", "dyngen.main", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env)


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


@pytest.mark.slow
def test_quickstart_runlocal_trains_evaluates_resumes_and_samples(tmp_path, digits_data_dir):
  common = ["--config=configs/quickstart.py:runlocal", f"--workdir={tmp_path}",
            f"--config.data.data_dir={digits_data_dir}"]
  result = run_main(*common)
  assert result.returncode == 0, result.stderr[-5000:]
  assert "steps/s" in result.stderr and "ETA" in result.stderr  # The progress display.
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [10, 20]
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert (tmp_path / "samples" / "grid_step_20.png").exists()
  results = json.loads((tmp_path / "samples" / "eval_step_20.json").read_text())
  assert results["num_samples"] == 100
  assert 0 <= results["classifier_accuracy_on_samples"] <= 1 and results["frechet_distance"] >= 0
  # The digits classifier itself must be a good judge on real test digits.
  assert results["classifier_test_accuracy"] > 0.9

  # Rerunning the same command resumes: it finds step 20 and has nothing left to train. Started without
  # GLIBC_TUNABLES (conftest gives it to the test processes), dyngen.main restarts itself with it.
  environ = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
  result = run_main(*common, env=environ)
  assert result.returncode == 0 and "Resumed from step 20" in result.stderr
  if host_memory.restart_needed(environ):
    assert "host memory: glibc malloc with glibc.malloc.hugetlb=1" in result.stderr

  result = run_main(*common, "--mode=sample", "--config.sample.num_samples=20")
  assert result.returncode == 0, result.stderr[-5000:]
  (npz,) = (tmp_path / "samples").glob("dit_ddpm10_*_n20.npz")
  with np.load(npz) as arrays:
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (20, 8, 8, 1)
