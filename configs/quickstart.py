r"""The embedded quickstart: a small DiT on the 8x8 digits, trained on a CPU in about ten minutes.

  python -m dyngen.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Trains class-conditionally on the 1,437 training digits of the embedded dataset (no download), writes
sample grids, then samples 1,000 digits (100 per class) with classifier-free guidance and scores them
against the 360 held-out test digits: the accuracy of a digits classifier trained on the real training
split (the classifier's own accuracy on the real test digits is reported beside it) and the Frechet
distance in that classifier's feature space.

The recipe departs from DiT's where a short run needs it: a higher learning rate with warm-up and
clipping, and an EMA decay suited to a few thousand steps instead of 400K.

`:runlocal` shrinks it further to a one-minute smoke run.
"""
import ml_collections

from configs import common
from dyngen import data as data_lib


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.training_config()
  config.data = data_lib.default_config("digits")
  config.model = ml_collections.ConfigDict(dict(
      name="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=96, depth=4, num_heads=4,
      mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True, attention="auto",
      attention_chunk_size=1024, dtype="float32", remat=False))

  config.batch_size = 128
  config.num_train_steps = 3000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 1.0
  config.ema.decay = 0.999

  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.sample_every_steps = 1000
  config.profile.num_steps = 0

  config.sample.sampler = "ddpm"
  config.sample.num_steps = 100
  config.sample.cfg_scale = 2.0
  config.sample.grid_cfg_scale = 2.0
  config.sample.guidance_channels = 0  # One channel: guide it (0 = all channels).
  config.sample.num_samples = 1000
  config.sample.batch_size = 500
  config.sample.grid_size = 100
  config.evaluation.metric = "digits"
  config.evaluation.num_samples = 1000

  if arg.runlocal:
    common.shrink_for_runlocal(config)
  return config
