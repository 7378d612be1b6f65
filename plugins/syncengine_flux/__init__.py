"""FLUX.1 (dev and schnell) through diffusers: a rectified-flow transformer on packed 2x2 latent tokens."""
