r"""DyDiT on flow matching on the embedded digits: the flow quickstart's dense DiT fine-tuned under a FLOPs
target λ = 0.5 (CPU), DyDiT's recipe unchanged on SiT's objective.

  python -m dyngen.main --config=configs/flow_dydit_quickstart.py --workdir=/tmp/flow_dydit_quickstart

As configs/dydit_quickstart.py, on configs/flow_quickstart.py: without `--config.init_from` the dense
flow-matching DiT is trained first in <workdir>/pretrain; its EMA weights warm-start the routed model (routers
fresh, all units on), which is fine-tuned with the flow-matching loss of the dynamic model and of the complete
model plus the FLOPs loss (quartile-stratified flow times, λ held at 1 for 100 steps, then ramped to 0.5).
Both are sampled alike (Heun, 100 model evaluations per sample); <workdir>/summary.json holds the
digits-classifier accuracy and Fréchet distance of each and the FLOPs ratio the routed model achieved over
every model evaluation of the sampling schedule.

`:runlocal` shrinks both stages to a one-minute smoke run.
"""
from dyngen.configs import dydit_quickstart
from dyngen.configs import flow_quickstart
from dyngen.recipes import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  variant = "runlocal" if arg.runlocal else None
  config = flow_quickstart.get_config(variant)
  config.model.name = "dydit"
  config.model.update(dict(router_tau=5.0, router_threshold=0.5))
  config.pretrain = flow_quickstart.get_config(variant)  # The warm start's run when config.init_from is "".
  return dydit_quickstart.fine_tune_on_digits(config, arg.runlocal)
