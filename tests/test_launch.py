"""launch/tpu_pod.sh and launch/gpu_slurm.sh in dry-run mode: the exact commands they would run, and the
config they start passes every check for the slice's devices and hosts (the old scripts started configs that
stopped at once)."""
import os
import pathlib
import shlex
import subprocess

from absl import flags
from ml_collections import config_flags
import pytest

from dyngen.train import config_checks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LATENT_FLAGS = ["--config.data.latent_dir=gs://bucket/latents", "--config.latent.vae=gs://bucket/sd-vae-ft-ema"]


def dry_run(script, args, env=None):
  result = subprocess.run(["bash", str(REPO_ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1", **(env or {})), cwd=REPO_ROOT, check=False, timeout=60)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def main_flags(words):
  """The flags of the `python -m dyngen.main` inside a command line (up to a shell redirection)."""
  start = words.index("dyngen.main") + 1
  end = next((i for i, word in enumerate(words) if word.startswith(">")), len(words))
  return words[start:end]


def config_of(dyngen_flags):
  """The ConfigDict that dyngen.main would build from these flags (relative config paths from the repo root)."""
  wanted = [f for f in dyngen_flags if f.startswith("--config")]
  argv = ["dyngen.main"] + [f"--config={REPO_ROOT / f[len('--config='):]}" if f.startswith("--config=") else f
                            for f in wanted]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


def test_tpu_pod_dry_run_prints_every_command_and_a_config_that_runs_on_the_slice():
  env = dict(REPO="https://git.example/dyngen.git", TPU_NAME="pod", ZONE="us-central2-b", ACCELERATOR="v4-64",
             BUCKET="gs://bucket", CONFIG="configs/dit_xl.py:XL/2")
  commands = dry_run("tpu_pod.sh", LATENT_FLAGS, env)
  create, install, start = commands
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-id=pod", "--zone=us-central2-b", "--accelerator-type=v4-64"} <= set(create)
  for ssh in (install, start):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
  assert "pip install" in install[-1] and "git clone https://git.example/dyngen.git" in install[-1]
  (command,) = [word[len("--command="):] for word in start if word.startswith("--command=")]
  dyngen_flags = main_flags(shlex.split(command))
  assert "--distributed" in dyngen_flags and "--workdir=gs://bucket/dit_xl" in dyngen_flags
  # v4-64: 32 chips (one JAX device each) on 8 workers.
  config_checks.check_config(config_of(dyngen_flags), num_devices=32, process_count=8)


def test_slurm_dry_run_starts_one_process_per_gpu_with_a_config_that_runs():
  (command,) = dry_run("gpu_slurm.sh", ["configs/dit_xl.py:XL/2", "/shared/dit_xl", *LATENT_FLAGS])
  assert command[:2] == ["srun", "--kill-on-bad-exit=1"] and "--distributed" in command
  script = (REPO_ROOT / "launch" / "gpu_slurm.sh").read_text()
  assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --gpus-per-task=1" in script
  # 2 nodes of 8 GPUs: 16 processes of one device each.
  config_checks.check_config(config_of(main_flags(command)), num_devices=16, process_count=16)


def test_slurm_without_arguments_says_how_to_call_it():
  result = subprocess.run(["bash", str(REPO_ROOT / "launch" / "gpu_slurm.sh")], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2 and "usage: sbatch" in result.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sh"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", str(REPO_ROOT / "launch" / script)], check=True)
