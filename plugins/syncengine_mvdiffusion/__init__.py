"""MVDiffusion (Tang et al. 2023): Stable Diffusion with correspondence-aware attention across perspective views."""
