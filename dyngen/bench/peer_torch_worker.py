r"""The PyTorch side of `python -m dyngen.bench.peer`: one measurement of the official DiT in this process.

  TORCH_PYTHON dyngen/bench/peer_torch_worker.py --official_dit=DiT --what=train --batch=8 --warmup=2 --repeats=5

Imports only torch, the standard library and the official code of facebookresearch/DiT at ed81ce2
(`--official_dit`: its models.py, which needs timm, and diffusion/); dyngen never imports this file and torch
is no dependency of dyngen. What each `--what` runs is in the docstring of dyngen/bench/peer.py. Prints, last,
`RESULT {json}` with every timed repeat's wall, process CPU and kernel CPU seconds and minor page faults.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peer_timing.py, beside this file.
from peer_timing import timed  # noqa: E402  (standard library only; dyngen is not importable here)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official_dit", required=True, help="A checkout of facebookresearch/DiT (ed81ce2).")
  parser.add_argument("--what", required=True, choices=["train", "forward", "sample", "sample_cfg", "attention",
                                                            "attention_forward"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--sample_steps", type=int, default=50)
  parser.add_argument("--cfg_scale", type=float, default=1.5)
  parser.add_argument("--hidden_size", type=int, default=384)
  parser.add_argument("--num_heads", type=int, default=6)
  parser.add_argument("--patch_size", type=int, default=2)
  parser.add_argument("--depth", type=int, default=12)
  return parser.parse_args()


def attention_core(attn, torch):
  """What timm's Attention (the official block's `attn`) runs between its qkv and proj linears: (B, N, 3C) ->
  (B, N, C). Its fused path (F.scaled_dot_product_attention), the one DiT's blocks take on torch 2."""
  heads = attn.num_heads

  def core(qkv):
    batch, tokens, three_width = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, heads, three_width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)  # Identity in DiT (qk_norm off).
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, three_width // 3)
  return core


def main():
  args = parse_args()
  for name in ("models.py", os.path.join("diffusion", "__init__.py")):
    if not os.path.isfile(os.path.join(args.official_dit, name)):
      sys.exit(f"--official_dit={args.official_dit!r} has no {name}: it must be a checkout of facebookresearch/DiT "
               "at ed81ce2.")
  sys.path.insert(0, args.official_dit)
  import torch
  from diffusion import create_diffusion  # The official diffusion/ package.
  from models import DiT  # The official models.py.

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  # DiT-S/2's shape by default; input 32x32x4, 1000 classes, learned sigma, label dropout 0.1 (the defaults).
  model = DiT(input_size=32, patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth,
              num_heads=args.num_heads, num_classes=1000)
  with torch.no_grad():  # Off the zero init of adaLN and the final layer, as dyngen's worker does.
    for parameter in model.parameters():
      if parameter.requires_grad:
        parameter.add_(0.01)
  generator = torch.Generator().manual_seed(1)
  x = torch.randn(args.batch, 4, 32, 32, generator=generator)
  y = torch.randint(0, 1000, (args.batch,), generator=generator)
  result = {"framework": "torch", "version": torch.__version__, "what": args.what, "batch": args.batch,
            "threads": torch.get_num_threads(), "compile_s": 0.0,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  out = {}

  if args.what.startswith("attention"):  # One block's attention core (see attention_core).
    tokens, width = (32 // args.patch_size) ** 2, args.hidden_size
    qkv = torch.randn(args.batch, tokens, 3 * width, generator=generator)
    weights = torch.randn(args.batch, tokens, width, generator=generator)
    core = attention_core(model.blocks[0].attn, torch)
    result["fused_attn"] = bool(getattr(model.blocks[0].attn, "fused_attn", False))
    if args.what == "attention":
      qkv.requires_grad_(True)

      def call():
        (core(qkv) * weights).sum().backward()
        qkv.grad = None
    else:
      def call():
        with torch.no_grad():
          core(qkv)
    warmup = args.warmup
  elif args.what == "train":  # The step of the official train.py (its VAE encoding aside: x stands for latents).
    ema = DiT(input_size=32, patch_size=args.patch_size, hidden_size=args.hidden_size, depth=args.depth,
              num_heads=args.num_heads, num_classes=1000)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    ema.eval()
    diffusion = create_diffusion(timestep_respacing="")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model.train()
    pairs = list(zip(ema.parameters(), model.parameters()))

    def call():
      t = torch.randint(0, diffusion.num_timesteps, (args.batch,))
      loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      with torch.no_grad():  # The EMA of train.py: ema = 0.9999 ema + 0.0001 param, parameter by parameter.
        for ema_parameter, parameter in pairs:
          ema_parameter.mul_(0.9999).add_(parameter.data, alpha=1 - 0.9999)
      out["loss"] = loss.item()
    warmup = args.warmup
  else:
    torch.set_grad_enabled(False)  # As the official sample.py.
    model.eval()
    if args.what == "forward":
      t = torch.full((args.batch,), 500, dtype=torch.long)
      call, warmup = (lambda: model(x, t, y)), args.warmup
    else:
      diffusion = create_diffusion(str(args.sample_steps))
      if args.what == "sample_cfg":  # As sample.py: [z; z], [y; null], forward_with_cfg.
        z = torch.cat([x, x])
        model_fn, kwargs = model.forward_with_cfg, dict(y=torch.cat([y, torch.full_like(y, 1000)]),
                                                       cfg_scale=args.cfg_scale)
      else:
        z, model_fn, kwargs = x, model.forward, dict(y=y)
      t = torch.full((z.shape[0],), 500, dtype=torch.long)
      for _ in range(args.warmup):  # Model calls at the loop's batch, not whole loops.
        model_fn(z, t, **kwargs)

      def call():
        out["samples"] = diffusion.p_sample_loop(model_fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                                 progress=False, device="cpu")
      warmup = 0
  result.update(timed(call, warmup, args.repeats))
  if "loss" in out and not torch.isfinite(torch.tensor(out["loss"])):
    sys.exit(f"non-finite loss {out['loss']}")
  if "samples" in out and not torch.isfinite(out["samples"]).all():
    sys.exit("non-finite samples")
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
