"""Stable Diffusion XL denoiser (base, Turbo, Lightning, LCM) through diffusers, and its tiny random test model."""
