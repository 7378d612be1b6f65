"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) through diffusers, and its tiny random test model."""
