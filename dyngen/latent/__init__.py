"""Latent space of the SD-VAE: the Flax AutoencoderKL, its weights, and latent extraction for training.

  vae = load_autoencoder(path)            a diffusers-layout file (.safetensors or .bin) or its folder
  mean, logvar = vae.encode(x)            x (B, H, W, 3) NHWC in [-1, 1] -> (B, H/8, W/8, 4) each, unscaled
  images = vae.decode(z)                  z unscaled (B, h, w, 4) -> (B, 8h, 8w, 3)
  vae.scale_factor                        0.18215: DiT trains on scale_factor * sample
  python -m dyngen.latent.extract --data=imagenet2012 --vae=PATH --output=DIR    (dyngen/latent/extract.py)
"""
from dyngen.latent.autoencoder import Autoencoder
from dyngen.latent.autoencoder import AutoencoderKL
from dyngen.latent.autoencoder import AutoencoderKLConfig
from dyngen.latent.autoencoder import sample_posterior
from dyngen.latent.weights import load_autoencoder
from dyngen.latent.weights import load_autoencoder_params
