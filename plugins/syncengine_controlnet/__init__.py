"""ControlNet-conditioned windows: the ``controlnet`` denoiser, condition images and their preprocessors."""
