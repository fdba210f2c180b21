"""Official PyTorch checkpoints -> dyngen Flax params, without torch and without running code from the file.

One rule table per model family: dyngen/convert/dit.py (facebookresearch/DiT), dig.py (hustvl/DiG).

  load_torch_params(path, model_config) -> params      (dyngen/convert/load.py)
  read_torch_checkpoint(path) -> object                (the safe .pt reader, dyngen/convert/torch_checkpoint.py)
  python -m dyngen.convert --config=configs/dit_xl.py --torch_checkpoint=X.pt --output=DIR
"""
from dyngen.convert.load import load_torch_params
from dyngen.convert.load import select_state_dict
from dyngen.convert.param_mapping import ParamMappingError
from dyngen.convert.torch_checkpoint import CheckpointFormatError
from dyngen.convert.torch_checkpoint import read_torch_checkpoint
from dyngen.convert.torch_checkpoint import TrainingArgs
from dyngen.convert.torch_checkpoint import UnsafeCheckpointError
