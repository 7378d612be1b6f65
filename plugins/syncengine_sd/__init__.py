"""Stable Diffusion denoisers (SD 1.x / 2.x, epsilon and v-prediction) through diffusers, and the tiny demo model."""
