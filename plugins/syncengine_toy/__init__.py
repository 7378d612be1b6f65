"""The toy world: a procedural landscape generator with discrete global looks, the small Stable-Diffusion-format
model the project trains on it and ships (``pretrained: syncengine:toy``), and a look classifier that measures
coherence independently of any sync loss."""
