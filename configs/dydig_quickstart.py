r"""DyDiG on the embedded digits: a quickstart-sized DiG fine-tuned under a FLOPs target λ = 0.5 (CPU).

  python -m dyngen.main --config=configs/dydig_quickstart.py --workdir=/tmp/dydig_quickstart

The twin of configs/dydit_quickstart.py on DiG blocks: without `--config.init_from`, the dense DiG (the
quickstart's recipe with DiG blocks of the same width and depth) is trained first in <workdir>/pretrain,
then warm-starts the routed model (routers fresh, all units on), which is fine-tuned with DyDiT's stage-1
objective; <workdir>/summary.json compares the two (digits accuracy, Fréchet distance, achieved FLOPs ratio).

`:runlocal` shrinks both stages to a one-minute smoke run.
"""
import ml_collections

from dyngen.configs import dydit_quickstart
from dyngen.configs import quickstart
from dyngen.recipes import common


def dense_dig_config(runlocal):
  """configs/quickstart.py with DiG blocks (depth 4: one turn of DiG's four scan directions)."""
  config = quickstart.get_config("runlocal" if runlocal else None)
  fields = {k: v for k, v in config.model.items() if k not in ("attention", "attention_chunk_size")}
  config.model = ml_collections.ConfigDict(dict(fields, name="dig", depth=4, gla_implementation="auto",
                                                gla_chunk_size=64))
  return config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = dense_dig_config(arg.runlocal)
  config.pretrain = dense_dig_config(arg.runlocal)
  config.model.name = "dydig"
  # The SwiGLU hidden of width 64 is 256 * ceil(170 / 256) = 256: 4 groups of 64, as the 4 heads.
  config.model.update(dict(mlp_groups=4, router_tau=5.0, router_threshold=0.5))
  return dydit_quickstart.fine_tune_on_digits(config, arg.runlocal)
