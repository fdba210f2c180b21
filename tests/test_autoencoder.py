"""The Flax SD-VAE reproduces diffusers' AutoencoderKL (tests/data/sd_vae) and its loader checks every tensor.

The fixture stores no weights: `fixture_state_dict` regenerates them from the manifest alone (seed, rule and
order of its param_list; every tensor checked against the manifest's sha256), they are written in the real
file format (safetensors, the diffusers layout) and loaded through `load_autoencoder`, the path users take.
Tolerances (arrays are compared relative to the reference's largest magnitude, NCHW -> NHWC):
- float32 against the float64 reference: 1e-5. diffusers' own float32 run is ~1e-5 from its float64 run
  (manifest: decoded 2.2e-5 absolute on values up to 2.3, 9.8e-6 relative); ours measured 3.8e-6 (decoded),
  <= 2.2e-6 elsewhere.
- float32 against diffusers' float32 run: 2e-5 (the two float32 roundings add up; measured 8.8e-6).
- float64 against the float64 reference: 1e-12 (the same function up to float64 rounding; measured 2e-14).
"""
import hashlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dyngen import latent
from dyngen.convert import ParamMappingError
from dyngen.latent import weights as weights_lib
from tests.test_convert import Storage, Tensor, write_zip_checkpoint

CASE = pathlib.Path(__file__).parent / "data" / "sd_vae"
# Module outputs the fixture stores, by Flax module path, for localising a mismatch.
INTERMEDIATES = {("encoder",): "encoder_out", ("encoder", "mid_block"): "encoder_mid", ("quant_conv",): "moments",
                 ("post_quant_conv",): "post_quant_conv_out", ("decoder", "mid_block"): "decoder_mid"}
# A small architecture of the same kind, for the loader's error paths (no 335 MB file per case).
SMALL = latent.AutoencoderKLConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)


def fixture_state_dict(manifest):
  """The fixture's weights from its manifest: one PCG64 generator walking param_list in order (README rule)."""
  gain = manifest["param_init"]["GAIN"]
  rng = np.random.default_rng(manifest["seeds"]["param_seed"])
  state_dict = {}
  for entry in manifest["param_list"]:
    shape = tuple(entry["shape"])
    if entry["rule"] == "fan_in_normal":
      values = rng.standard_normal(size=shape) * math.sqrt(gain / math.prod(shape[1:]))
    elif entry["rule"] == "norm_weight":
      values = rng.uniform(0.8, 1.2, size=shape)
    else:
      assert entry["rule"] == "bias", entry
      values = rng.normal(0.0, 0.02, size=shape)
    state_dict[entry["name"]] = values.astype(np.float32)
    assert hashlib.sha256(state_dict[entry["name"]].tobytes()).hexdigest() == entry["sha256_float32_le"], entry
  return state_dict


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def relative_error(actual, reference):
  return float(np.max(np.abs(np.asarray(actual, np.float64) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  manifest = json.loads((CASE / "manifest.json").read_text())
  state_dict = fixture_state_dict(manifest)
  path = tmp_path_factory.mktemp("sd_vae") / weights_lib.WEIGHT_FILE_NAMES[0]
  save_file(state_dict, str(path))
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  return dict(manifest=manifest, state_dict=state_dict, path=path, x=nhwc(inputs["x"]),
              outputs={k: outputs[k] for k in outputs.files})


@pytest.fixture(scope="module")
def vae(case):
  return latent.load_autoencoder(case["path"])


def run_with_intermediates(vae, x, mean_reference):
  """mean, logvar of x, the decoding of the reference mean, and the fixture's intermediates, in one jit."""

  def capture(module, method_name):
    return method_name == "__call__" and module.path in INTERMEDIATES

  def forward(params, x, z):
    (mean, logvar), encoded = vae.module.apply({"params": params}, x, method="encode", capture_intermediates=capture)
    decoded, decoded_state = vae.module.apply({"params": params}, z, method="decode", capture_intermediates=capture)
    found = {}
    for tree in (encoded["intermediates"], decoded_state["intermediates"]):
      for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        module_path = tuple(k.key for k in path[:-2])  # (..., '__call__', 0)
        found[INTERMEDIATES[module_path]] = value
    return dict(latent_mean=mean, latent_logvar=logvar, decoded=decoded, **found)

  return jax.jit(forward)(vae.params, x, mean_reference)


def test_config_matches_manifest(case):
  kwargs = case["manifest"]["upstream"]["full_config_after_construction"]
  assert latent.AutoencoderKLConfig.from_diffusers(kwargs) == latent.AutoencoderKLConfig()
  # The rule table walks diffusers' state dict in its order (what seeded_state_dict relies on).
  expected = [(e["name"], tuple(e["shape"])) for e in case["manifest"]["param_list"]]
  assert list(weights_lib.state_dict_shapes(latent.AutoencoderKLConfig()).items()) == expected


def test_parity_float32(case, vae):
  out = case["outputs"]
  got = run_with_intermediates(vae, case["x"], nhwc(out["latent_mean_f32"]))
  assert got["latent_mean"].shape == (2, 8, 8, 4) and got["latent_mean"].dtype == jnp.float32
  for name, value in got.items():
    # decoded is of the float32 reference mean, so its float64 counterpart is decoded_f64 of the float64 mean:
    # the 3e-6 difference of the two means is within the tolerance after decoding (measured 3.8e-6 in total).
    assert relative_error(value, nhwc(out[f"{name}_f64"])) < 1e-5, name
    assert relative_error(value, nhwc(out[f"{name}_f32"])) < 2e-5, name
  # The public calls give the same numbers; DiT's scaled latent is 0.18215 * mean.
  mean, logvar = vae.encode(case["x"])
  np.testing.assert_allclose(mean, got["latent_mean"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(logvar, got["latent_logvar"], rtol=0, atol=1e-6)
  assert vae.scale_factor == 0.18215
  assert relative_error(vae.scale_factor * mean, nhwc(out["latent_scaled_f64"])) < 1e-5
  assert relative_error(vae.decode(mean), nhwc(out["decoded_f64"])) < 1e-5


@pytest.mark.slow  # ~17 s: XLA:CPU compiles and runs the whole VAE again in float64
def test_parity_float64(case):
  out = case["outputs"]
  with jax.enable_x64(True):
    params, config = weights_lib.load_autoencoder_params(case["path"])
    vae64 = latent.Autoencoder(config, params, dtype=jnp.float64)
    got = run_with_intermediates(vae64, case["x"].astype(np.float64), nhwc(out["latent_mean_f64"]))
    assert got["decoded"].dtype == jnp.float64
  for name, value in got.items():
    assert relative_error(value, nhwc(out[f"{name}_f64"])) < 1e-12, name


def test_legacy_attention_names_load_the_same_params(case, vae, tmp_path):
  """query/key/value/proj_attn (the 2022 files), one of them even as a 1x1 conv, give identical params."""
  legacy = {}
  for name, value in case["state_dict"].items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if ".mid_block.attentions.0." in name and f".{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
    legacy[name] = value
  legacy["decoder.mid_block.attentions.0.value.weight"] = legacy["decoder.mid_block.attentions.0.value.weight"][
      :, :, None, None]
  assert "encoder.mid_block.attentions.0.proj_attn.bias" in legacy and not any(".to_q." in n for n in legacy)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file(legacy, str(path))
  params, _ = weights_lib.load_autoencoder_params(path)
  flat_new = dict(jax.tree_util.tree_flatten_with_path(vae.params)[0])
  flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  assert flat_new.keys() == flat_old.keys()
  for key, value in flat_new.items():
    np.testing.assert_array_equal(flat_old[key], value, err_msg=jax.tree_util.keystr(key))


def test_layouts_are_transposed_as_torch_stores_them(case, vae):
  """Conv (out, in, kh, kw) -> (kh, kw, in, out); Linear (out, in) -> (in, out); GroupNorm weight -> scale."""
  sd, p = case["state_dict"], vae.params
  conv = sd["encoder.down_blocks.1.resnets.0.conv1.weight"]  # (256, 128, 3, 3)
  kernel = np.asarray(p["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])
  assert kernel.shape == (3, 3, 128, 256)
  assert kernel[2, 0, 5, 7] == conv[7, 5, 2, 0]
  to_q = np.asarray(p["decoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"])
  assert to_q[3, 11] == sd["decoder.mid_block.attentions.0.to_q.weight"][11, 3]
  np.testing.assert_array_equal(p["decoder"]["conv_norm_out"]["scale"], sd["decoder.conv_norm_out.weight"])


@pytest.fixture(scope="module")
def small_state_dict():
  return weights_lib.seeded_state_dict(SMALL, seed=0)


@pytest.fixture(scope="module")
def small_vae(small_state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("small_vae") / "diffusion_pytorch_model.safetensors"
  save_file(small_state_dict, str(path))
  return latent.load_autoencoder(path, config=SMALL)


def test_posterior_sample_and_batch_chunking(small_vae):
  x = np.random.default_rng(0).uniform(-1, 1, size=(3, 8, 8, 3)).astype(np.float32)
  mean, logvar = small_vae.encode(x)
  assert mean.shape == logvar.shape == (3, 4, 4, 4)
  # DiT's latents, scale_factor * a posterior sample, of 2000 copies of the first image (one compiled program;
  # XLA:CPU takes seconds for each random-number program): the sample mean lies within 4.5 standard errors of
  # 0.18215 * mean (all 64 values), the sample std within 10% of 0.18215 * exp(logvar / 2) (std error ~1.6%).
  draws = np.asarray(small_vae.encode_scaled(np.repeat(x[:1], 2000, axis=0), jax.random.key(0)))
  std = 0.18215 * np.exp(0.5 * np.asarray(logvar[:1]))
  assert np.all(np.abs(draws.mean(0) - 0.18215 * mean[:1]) < 4.5 * std / math.sqrt(2000))
  np.testing.assert_allclose(draws.std(0), std[0], rtol=0.1)
  # batch_size chunks (the last one padded) give the whole batch's result; chunks of 3 run the program
  # compiled above (the test session's compilation cache serves it), 1e-5 in case the padding changes sums.
  chunked = latent.Autoencoder(small_vae.config, small_vae.params, batch_size=3)
  np.testing.assert_allclose(chunked.encode(np.concatenate([x, x[:1]]))[0], np.concatenate([mean, mean[:1]]),
                             rtol=1e-5, atol=1e-5)


def test_wrong_file_lists_missing_unexpected_and_misshaped(small_state_dict, tmp_path):
  broken = dict(small_state_dict)
  del broken["decoder.up_blocks.1.resnets.1.conv1.weight"]
  broken["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  broken["encoder.mid_block.attentions.0.to_q.lora"] = np.zeros((4,), np.float32)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  save_file(broken, str(path))
  with pytest.raises(ParamMappingError) as error:
    latent.load_autoencoder(tmp_path, config=SMALL)
  message = str(error.value)
  assert "missing in the checkpoint (1)" in message and "decoder.up_blocks.1.resnets.1.conv1.weight" in message
  assert "unexpected in the checkpoint" in message and "encoder.mid_block.attentions.0.to_q.lora (4,)" in message
  assert "mis-shaped (1)" in message and "encoder.conv_in.weight: checkpoint (32, 3, 5, 5), model expects " \
         "(32, 3, 3, 3)" in message
  # The full SD-VAE architecture (no config.json) does not fit the small file: every difference is listed.
  save_file(small_state_dict, str(path))
  with pytest.raises(ParamMappingError, match=r"missing in the checkpoint \(\d+\)"):
    latent.load_autoencoder(path)


def test_config_json_and_torch_bin(small_state_dict, tmp_path):
  """A diffusers folder (config.json + .bin read by the safe reader) loads without naming the config."""
  storages = {}
  state_dict = {}
  for index, (name, value) in enumerate(small_state_dict.items()):
    storages[name] = Storage(str(index), value.reshape(-1), "FloatStorage")
    stride = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
    state_dict[name] = Tensor(storages[name], 0, value.shape, stride)
  write_zip_checkpoint(tmp_path / "diffusion_pytorch_model.bin", state_dict)
  config = dict(_class_name="AutoencoderKL", _diffusers_version="0.4.2", block_out_channels=[32, 64],
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                layers_per_block=1, norm_num_groups=8, latent_channels=4)
  (tmp_path / "config.json").write_text(json.dumps(config))
  vae = latent.load_autoencoder(tmp_path)
  assert vae.config == SMALL and vae.downsample_factor == 2
  np.testing.assert_array_equal(vae.params["quant_conv"]["kernel"][0, 0],
                                small_state_dict["quant_conv.weight"][:, :, 0, 0].T)
  mean, logvar = vae.encode(np.zeros((1, 8, 8, 3), np.float32))
  assert mean.shape == logvar.shape == (1, 4, 4, 4)
  assert vae.decode(mean).shape == (1, 8, 8, 3)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, down_block_types=["CrossAttnDownBlock2D"] * 2)))
  with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
    latent.load_autoencoder(tmp_path)


def test_bad_inputs_are_named(small_state_dict, tmp_path):
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    latent.load_autoencoder(tmp_path)
  both = dict(small_state_dict)
  both["encoder.mid_block.attentions.0.query.weight"] = both["encoder.mid_block.attentions.0.to_q.weight"]
  save_file(both, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match="both the old and the current"):
    latent.load_autoencoder(tmp_path, config=SMALL)


def test_bad_image_shape_is_named(small_vae):
  with pytest.raises(ValueError, match=r"NHWC \(B, H, W, 3\) with H and W multiples of 2"):
    small_vae.encode(np.zeros((1, 3, 8, 8), np.float32))
  with pytest.raises(ValueError, match=r"latents must be NHWC \(B, h, w, 4\)"):
    small_vae.decode(np.zeros((1, 4, 4, 3), np.float32))


def test_upsample_conv_is_nearest_x2_then_conv():
  """The 4-phase low-resolution form against the direct one (jnp.repeat, then a SAME 3x3 conv), float64."""
  from dyngen.latent.autoencoder import UpsampleConv
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = rng.standard_normal((2, 5, 7, 6))
    kernel, bias = rng.standard_normal((3, 3, 6, 4)), rng.standard_normal(4)
    got = UpsampleConv(4, dtype=jnp.float64).apply({"params": {"kernel": kernel, "bias": bias}}, x)
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = bias + sum(np.einsum("bhwi,io->bhwo", padded[:, dy:dy + 10, dx:dx + 14], kernel[dy, dx])
                      for dy in range(3) for dx in range(3))
    assert got.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
