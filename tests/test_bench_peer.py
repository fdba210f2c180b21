"""dyngen.bench.peer: the driver and its dyngen worker end to end at a tiny size (no PyTorch here), the table
built from those real results, the FLOPs behind "% of peak", and the errors a user meets first."""
import json
import os
import pathlib
import subprocess
import sys

from absl import app
import jax.numpy as jnp
import pytest

from dyngen.bench import peer
from dyngen.models import attention

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


def peer_command(*flags):
  return [sys.executable, "-m", "dyngen.bench.peer", *flags]


CASE = {case.name: case for case in peer.CASES}
TINY = ("--variant=S/8", "--depth=1", "--batch=1", f"--sample_steps={STEPS}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 1-block DiT-S/8 at batch 1: the driver without --torch_python on guided sampling and, beside it (the
  two compiles overlap on 2 cores), a train-step worker. -> (driver stdout, report, its JSON, train RESULT)."""
  out = tmp_path_factory.mktemp("peer")
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  train = subprocess.Popen(peer_command("--worker=jax", "--what=train", "--warmup=1", "--repeats=2", *TINY),
                           cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  driver = subprocess.run(
      peer_command("--only=sample_cfg", *TINY, "--quick", "--max_load=1000", "--max_foreign=1",
                   "--peak_gflops=100", f"--output={out / 'peer.md'}", f"--json={out / 'peer.json'}"),
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  train_stdout, train_stderr = train.communicate(timeout=300)
  assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
  assert train.returncode == 0, train_stdout[-3000:] + train_stderr[-3000:]
  result_line = train_stdout.strip().splitlines()[-1]
  assert result_line.startswith("RESULT {")
  return (driver.stdout, (out / "peer.md").read_text(), json.loads((out / "peer.json").read_text()),
          json.loads(result_line[len("RESULT "):]))


def test_the_workers_results(tiny_run):
  _, _, saved, train = tiny_run
  (sample,) = saved["results"]
  assert (train["framework"], train["what"], train["batch"]) == ("jax", "train", 1)
  assert (sample["framework"], sample["name"], sample["what"], sample["batch"]) == ("jax", "sample_cfg",
                                                                                    "sample_cfg", 1)
  for result, repeats in ((train, 2), (sample, CASE["sample_cfg"].quick[1])):
    assert all(len(result[key]) == repeats for key in ("wall_s", "cpu_s", "sys_s", "minor_faults"))
    assert all(wall > 0 for wall in result["wall_s"]) and result["compile_s"] > 0
  assert sum(sample["wall_s"]) < sample["process_wall_s"] and 0 <= sample["foreign_share"] <= 1
  # XLA counts the sampling loop's body once: the worker multiplies by the steps.
  assert sample["flops"] == pytest.approx(STEPS * sample["flops_per_step"])


def test_xla_flops_agree_with_the_analytic_count(tiny_run):
  # At this size (16 tokens, one block) the label and time embeddings, norms and the loss weigh in, which the
  # analytic count (matmuls only) leaves out; a loop counted per step, or not at all, would be 4x off.
  train = tiny_run[3]
  analytic = peer.analytic_flops(CASE["train_b8"], 1, "S/8", 1, STEPS)
  assert 1.0 < train["flops"] / analytic < 1.6
  (row,) = tiny_run[2]["rows"]
  assert row["flops_analytic"] == peer.analytic_flops(CASE["sample_cfg"], 1, "S/8", 1, STEPS)
  assert 0.8 < row["flops_xla"] / row["flops_analytic"] < 1.2


def test_the_table_and_the_last_line(tiny_run):
  stdout, markdown, saved, _ = tiny_run
  assert stdout.strip().splitlines()[-1] == (
      f"speedup_train_b32 nan speedup_train_b8 nan speedup_sample_cfg nan speedup_forward nan")
  assert "PyTorch not run (no `--torch_python`" in markdown
  assert "Load average (1/5/15 min)" in markdown and "100 GFLOP/s fp32 peak (--peak_gflops)" in markdown
  lines = [line for line in markdown.splitlines() if line.startswith(f"| {STEPS}-step DDPM sampling B=1, cfg 1.5")]
  assert len(lines) == 1
  cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
  row = saved["rows"][0]
  assert cells[2:5] == ["–", f"{row['jax_s']:.3f}", "–"]  # PyTorch s, dyngen s, speedup
  assert cells[6] == f"– / {100 * row['flops_xla'] / row['jax_s'] / 100e9:.0f}%"
  assert "/tmp" not in markdown.split("\n")[2]  # The command shown names no path of this machine.
  assert "Not a quiet host" not in markdown  # --max_load=1000 --max_foreign=1
  assert f"dyngen/host_memory.py): dyngen's worker: {saved['results'][0]['host_memory']}." in markdown
  busy = peer.report(saved["rows"], dict(saved["context"], max_foreign=-1.0))
  assert "**Not a quiet host** (load average" in busy and busy.endswith(peer.SETUP)


def test_rows_from_both_frameworks(tiny_run):
  # The table's arithmetic on the worker's real result, with a PyTorch side twice as slow in round 0 and
  # three times in round 1: the speedup is the ratio of the medians over rounds, each round's ratio shown.
  jax_result = dict(tiny_run[3], name="train_b8", foreign_share=0.0)
  results = []
  for round_index, factor in ((0, 2.0), (1, 3.0)):
    results.append(dict(jax_result, round=round_index))
    results.append(dict(jax_result, framework="torch", round=round_index, compile_s=0.0,
                        wall_s=[factor * wall for wall in jax_result["wall_s"]]))
  row = peer.summarise(CASE["train_b8"], "train", results, 100e9, analytic=1e9)
  assert row["round_ratios"] == pytest.approx([2.0, 3.0])
  assert row["speedup"] == pytest.approx(2.5)
  assert row["torch_peak_fraction"] == pytest.approx(row["jax_peak_fraction"] / 2.5)
  assert "| **2.50×** | 2.00, 3.00 |" in peer.table([row])
  assert peer.last_line([row]).split()[2:4] == ["speedup_train_b8", "2.500"]


def test_the_attention_rows_measure_the_attention_core():
  # The attention worker at DiT-S/8's 16 tokens, batch 2: the forward + backward program and the forward alone,
  # both in one process each, run side by side, with the implementation the model resolves to on this host.
  # XLA's count sees only the work outside the fused CPU kernel (the loss's product with w), so it stays below
  # the analytic count (the two products forward, four more backward).
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  workers = {what: subprocess.Popen(peer_command("--worker=jax", f"--what={what}", "--warmup=1", "--repeats=2",
                                                 "--variant=S/8", "--batch=2"),
                                    cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for what in ("attention", "attention_forward")}
  for what, worker in workers.items():
    stdout, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 0, stdout[-3000:] + stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1][len("RESULT "):])
    expected = attention.resolve_implementation("auto", 16, jnp.float32, "cpu")
    assert (result["what"], result["batch"], result["attention_implementation"]) == (what, 2, expected)
    assert len(result["wall_s"]) == 2 and all(wall > 0 for wall in result["wall_s"])
    analytic = peer.analytic_flops(CASE[what], 2, "S/8", 0, STEPS)
    assert analytic == (3 if what == "attention" else 1) * 2 * 2 * 2 * 6 * 16 * 16 * 64
    if expected == "cpu_fused":
      assert result["flops"] is None or result["flops"] < 0.1 * analytic  # a custom call counts -1, "unknown"
    else:  # XLA counts the softmax's elementwise work too: a few % at 16 tokens of 64 channels.
      assert 1.0 <= result["flops"] / analytic < 1.15


def test_official_dit_must_hold_the_official_code(tmp_path):
  with pytest.raises(app.UsageError, match=r"has no models\.py and no diffusion/__init__\.py.*git clone "
                                           r"https://github.com/facebookresearch/DiT"):
    peer.check_official_dit(str(tmp_path))
  (tmp_path / "models.py").write_text("")
  with pytest.raises(app.UsageError, match=r"has no diffusion/__init__\.py"):
    peer.check_official_dit(str(tmp_path))
  (tmp_path / "diffusion").mkdir()
  (tmp_path / "diffusion" / "__init__.py").write_text("")
  peer.check_official_dit(str(tmp_path))


def test_the_driver_refuses_before_measuring(tmp_path):
  run = lambda *flags: subprocess.run([sys.executable, "-m", "dyngen.bench.peer", *flags], cwd=REPO_ROOT,
                                      capture_output=True, text=True, timeout=120)
  process = run(f"--official_dit={tmp_path}", f"--torch_python={sys.executable}")
  assert process.returncode != 0 and "has no models.py" in process.stderr
  process = run(f"--official_dit={tmp_path}")
  assert process.returncode != 0 and "--torch_python and --official_dit go together" in process.stderr
  process = run("--only=train_b16")
  assert process.returncode != 0 and "--only names unknown measurements ['train_b16']" in process.stderr


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle():
  # The host: 2 Zen-3 cores at 2.45 GHz, 32 fp32 FLOP/cycle (two 256-bit FMA units): ~157 GFLOP/s.
  zen3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\ncpu MHz\t\t: 2450.000\n"
          "flags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\ncpu MHz\t\t: 1500.000\n")
  gflops, text = peer.cpu_peak(zen3, cores=2)
  assert gflops == pytest.approx(156.8)
  assert text == "AMD EPYC 7B13: 2 cores x 2.45 GHz x 32 fp32 FLOP/cycle (AVX2, 2 FMA units of 256 bits)"
  # Zen 4 has AVX-512 on 256-bit units; an Intel core with AVX-512 has two 512-bit FMA units.
  assert peer.cpu_peak(zen3.replace("avx2", "avx2 avx512f"), cores=2)[0] == pytest.approx(156.8)
  intel = zen3.replace("AuthenticAMD", "GenuineIntel").replace("avx2", "avx2 avx512f")
  assert peer.cpu_peak(intel, cores=1)[0] == pytest.approx(2.45 * 64)
  assert peer.cpu_peak(zen3.replace("fma avx2", ""), cores=4)[0] == pytest.approx(4 * 2.45 * 8)
