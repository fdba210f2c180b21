r"""Sample quality against model evaluations (NFE) for the flow-matching samplers of one digits checkpoint.

  python -m dyngen.main --config=configs/flow_quickstart.py --workdir=/tmp/flow_quickstart   # the checkpoint
  python -m dyngen.bench.flow_nfe --checkpoint=/tmp/flow_quickstart --output=docs/benchmarks/flow_digits_cpu.md

For each sampler of `--samplers` ("euler", "heun2", "sde_euler", "sde_heun") and each grid size of
`--num_steps` (SiT's convention: time-grid points), `--num_samples` guided digits (classes in turn, at each
guidance scale of `--cfg_scales`, default the checkpoint's) are sampled from the checkpoint's EMA weights
with the trainer's Sampler (a routed model on its fast path where the sampler has one, its achieved FLOPs
ratio reported) and scored as the trainer scores them (`config.evaluation`: the digits classifier's accuracy on the
samples and the Fréchet distance in its feature space, against the 300 test digits). Every row draws the same
starting noise (seed `--seed`). NFE counts model evaluations per sample (a guided evaluation runs the
conditional and the null rows together, as one): euler n − 1, heun2 2(n − 1), sde_euler n − 1 plus 1 for
the last step, sde_heun 2(n − 1) + 1. Seconds are the wall time of sampling a row (its one compile, a few
seconds, included) on this machine, with its load average beside.
"""
import json
import os
import time

from absl import app
from absl import flags
import jax
import ml_collections

from dyngen import checkpoint
from dyngen import host_memory
from dyngen.bench import measure
from dyngen.train import evaluation
from dyngen.train import sample as sample_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A flow-matching run's workdir or checkpoint (its config and EMA weights).")
flags.DEFINE_list("samplers", ["euler", "heun2", "sde_euler"], "Flow samplers (config.sample.sampler).")
flags.DEFINE_list("num_steps", ["6", "11", "26", "51", "101"], "Time-grid points (config.sample.num_steps).")
flags.DEFINE_integer("max_nfe", 101, "Skip settings above this many model evaluations per sample.")
flags.DEFINE_integer("num_samples", 1000, "Samples per row (the quickstart evaluates 1,000).")
flags.DEFINE_list("cfg_scales", [], "Guidance scales, each row at each; default the checkpoint's sample.cfg_scale.")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same starting noise for every row).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")
flags.DEFINE_string("json", "", "Also write the rows as JSON here.")
flags.DEFINE_list("previous_json", [], "Rows measured earlier (--json files of this checkpoint) to put first.")

SDE_SAMPLERS = ("sde_euler", "sde_heun")


def nfe(sampler: str, num_steps: int, last_step: str) -> int:
  """Model evaluations per sample of `sampler` on `num_steps` grid points (see the module docstring)."""
  per_step = 2 if sampler in ("heun2", "sde_heun") else 1
  return per_step * (num_steps - 1) + (1 if sampler in SDE_SAMPLERS and last_step else 0)


def measure_row(config, params, evaluator, sampler: str, num_steps: int, cfg_scale: float) -> dict:
  sample_config = ml_collections.ConfigDict(config.sample.to_dict())
  sample_config.update(dict(sampler=sampler, num_steps=num_steps, batch_size=FLAGS.num_samples))
  sampler_ = sample_lib.notebook_sampler(ml_collections.ConfigDict(dict(config.to_dict(), sample=sample_config)))
  labels = sample_lib.balanced_labels(FLAGS.num_samples, config.model.num_classes)
  start = time.perf_counter()
  images = sampler_.generate(params, labels, cfg_scale=cfg_scale, seed=FLAGS.seed)
  seconds = time.perf_counter() - start
  scores = evaluation.evaluate_samples(evaluator, images, labels)
  summary = sampler_.routing_summary()
  return dict(model=config.model.name, sampler=sampler, num_steps=num_steps,
              nfe=nfe(sampler, num_steps, sample_config.last_step), cfg_scale=cfg_scale,
              flops_ratio=summary.get("flops_ratio", 1.0), accuracy=scores["classifier_accuracy_on_samples"],
              frechet_distance=scores["frechet_distance"], seconds=seconds, load=os.getloadavg()[0])


def markdown(rows, config, cfg_scale) -> str:
  lines = [
      "# Flow matching on the digits: sample quality against model evaluations (CPU)", "",
      f"A checkpoint of the flow-matching digits quickstart ({config.model.name}, {config.num_train_steps} steps, "
      f"SiT's "
      f"{config.transport.path_type} path, {config.transport.prediction} prediction) sampled by "
      f"`python -m dyngen.bench.flow_nfe` ({FLAGS.num_samples} digits per row, classes in turn, the same "
      "starting noise for every row). FLOPs ratio: a routed model's over every model evaluation (1 for dense). "
      "Accuracy: the digits classifier's on the samples (its own on the real test digits is 97.7%); Fréchet: "
      "in its feature space against the 300 test digits (the evaluator's reference_frechet of real digits is "
      "1.56). NFE: model evaluations per sample (a guided evaluation runs the conditional and null rows "
      "together). The SDE is SiT's (w_t = sigma_t, last step "
      f"\"{config.sample.last_step}\" of {config.sample.last_step_size}). Seconds: wall time of sampling the "
      "row, its compile included, on a shared 2-core CPU, load average beside (timings under load are "
      "indicative only).", "",
      "| model | sampler | grid points | NFE | guidance | FLOPs ratio | accuracy | Fréchet | seconds | load |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    lines.append(f"| {row.get('model', config.model.name)} | {row['sampler']} | {row['num_steps']} | {row['nfe']} | "
                 f"{row.get('cfg_scale', cfg_scale)} | {row.get('flops_ratio', 1.0):.3f} | "
                 f"{100 * row['accuracy']:.1f}% | "
                 f"{row['frechet_distance']:.2f} | {row['seconds']:.0f} | {row['load']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required: a flow-matching run's workdir (configs/flow_quickstart.py).")
  config, params = checkpoint.load_for_inference(FLAGS.checkpoint)
  if config.get("objective", "diffusion") != "flow":
    raise app.UsageError(f"{FLAGS.checkpoint} was trained with objective {config.get('objective', 'diffusion')!r}; "
                         "this benchmark compares flow-matching samplers (config.objective = 'flow').")
  cfg_scales = [float(scale) for scale in FLAGS.cfg_scales] or [config.sample.cfg_scale]
  cfg_scale = config.sample.cfg_scale
  evaluator = evaluation.build_evaluator(config)
  rows = []
  for path in FLAGS.previous_json:
    with open(path) as f:
      rows.extend(json.load(f))
  for sampler in FLAGS.samplers:
    for num_steps in map(int, FLAGS.num_steps):
      if nfe(sampler, num_steps, config.sample.last_step) > FLAGS.max_nfe:
        continue
      for scale in cfg_scales:
        rows.append(measure_row(config, params, evaluator, sampler, num_steps, scale))
        print(json.dumps(rows[-1]), flush=True)
  measure.write_report(markdown(rows, config, cfg_scale), FLAGS.output, rows=rows, json_output=FLAGS.json)


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  jax.config.parse_flags_with_absl()
  app.run(main)
