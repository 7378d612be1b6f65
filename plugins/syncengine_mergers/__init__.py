"""Built-in mergers: uniform average (MultiDiffusion) and Gaussian weights (Mixture of Diffusers)."""
