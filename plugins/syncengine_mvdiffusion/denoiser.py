"""The ``mvdiffusion`` denoiser: Stable Diffusion whose views attend to each other's corresponding pixels.

All views of one ``predict`` call are denoised jointly: per classifier-free-guidance branch, every view's UNet
features attend (correspondence-aware attention, :mod:`.model`) to its neighbours' features around the pixels that
the rotation-only homographies (:mod:`.correspondence`) pair with its own. That makes a view's prediction depend on
the other views in its batch, so the sampler must hand over all views of a request at once
(``sampler.view_batch_size`` >= number of views; checked by ``check_run`` before loading, and on the first step).
A batch with a subset of the views — the SyncDiffusion step decodes the anchor alone and the other views together —
runs the attention among the views present (a view alone is plain SD), exactly as the official model does for any
number of views.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence

import torch

from syncengine.denoiser import NO_CONTEXT, Conditioning, PromptEmbedding, RequestContext, Step
from syncengine.errors import ConfigError
from syncengine.views import CanvasSpec, View
from syncengine_sd.denoiser import StableDiffusionConfig, StableDiffusionDenoiser

from .correspondence import Camera
from .loading import find_weights, load_blocks, load_official
from .model import CorrespondenceBlocks, Plan, view_group

if TYPE_CHECKING:
    from syncengine.config import ResolvedSpec
    from syncengine.sampler import Request

@dataclass
class MVDiffusionConfig(StableDiffusionConfig):
    checkpoint: Optional[str] = None  # official pano.ckpt; None: pretrained is a folder saved by save_pretrained
    neighbors: Literal["ring", "all"] = "ring"  # ring: the previous and next view (as trained); all: every other view
    trust_checkpoint: bool = False  # unpickle a .ckpt holding more than tensors (only for files you trust)


@dataclass
class MVRequest:
    """The mvdiffusion denoiser's per-request state (its request-context part): the encoded per-view prompts, and
    which views of the current step arrived in no-grad batches (the check that the sampler did not split them)."""

    view_prompts: Mapping[int, PromptEmbedding] = field(default_factory=dict)
    seen: tuple[int | None, frozenset[int]] = (None, frozenset())


class MVDiffusionDenoiser(StableDiffusionDenoiser):
    """SD components + correspondence-attention blocks; cameras come from ``view.context["camera"]``."""

    Config = MVDiffusionConfig
    joint_views = True  # the views of a batch attend to each other

    def __init__(self, config: MVDiffusionConfig | None = None):
        c = config if config is not None else MVDiffusionConfig()
        kind, where = find_weights(c.checkpoint, c.pretrained)  # before the multi-GB base model
        super().__init__(c)
        self.blocks = CorrespondenceBlocks(self.unet)
        if kind == "official":
            self.loaded = load_official(where, self.unet, self.blocks, self.vae, self.pipe.text_encoder,
                                        c.trust_checkpoint)
        else:
            load_blocks(self.blocks, where)
            self.loaded = {"blocks": len(self.blocks.state_dict())}
        self.blocks.to(self.device, self.dtype).requires_grad_(False).eval()
        self.blocks.attach(self.unet)
        self._plans: dict[Any, Plan] = {}  # a cache by cameras, the same for every request

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"checkpoint": self.config.checkpoint, "neighbors": self.config.neighbors,
                    "correspondence_blocks": len(CorrespondenceBlocks.sites(self.unet))})
        return out

    # ----------------------------------------------------------------------------------------------------- request

    MVDIFFUSION_PART = "mvdiffusion"  # the request context's part: an MVRequest

    def prepare_request(self, request: Request, canvas: CanvasSpec) -> RequestContext:
        """Per-view prompts from ``requests[].inputs.view_prompts`` (one per view, in view order), encoded once, in
        the request's context with a fresh batch watch."""
        view_prompts: dict[int, PromptEmbedding] = {}
        prompts = request.inputs.get("view_prompts")
        if prompts is not None:
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise ConfigError("requests[].inputs.view_prompts", "must be a list of non-empty prompts, one per view")
            cache: dict[str, PromptEmbedding] = {}
            with torch.no_grad():
                for i, prompt in enumerate(prompts):
                    if prompt not in cache:
                        cache[prompt] = self.encode_prompt(prompt, request.negative_prompt)
                    view_prompts[i] = cache[prompt]
        return super().prepare_request(request, canvas).with_part(self.MVDIFFUSION_PART, MVRequest(view_prompts))

    def request_state(self, context: RequestContext) -> MVRequest | None:
        """This denoiser's part of ``context``; None for a context that :meth:`prepare_request` did not make."""
        return context.get(self.MVDIFFUSION_PART)

    @staticmethod
    def _view_conds(conds: Sequence[Conditioning], views: Sequence[View], state: MVRequest) -> list[Conditioning]:
        if not state.view_prompts:
            return list(conds)
        out = []
        for cond, view in zip(conds, views):
            if view.index not in state.view_prompts:
                raise ConfigError("requests[].inputs.view_prompts", f"has {len(state.view_prompts)} prompts, but "
                                                                    f"the tiler made view {view.index}; give one per "
                                                                    f"view")
            out.append(Conditioning(state.view_prompts[view.index], cond.guidance_scale))
        return out

    @classmethod
    def check_run(cls, spec: ResolvedSpec, views: Sequence[View]) -> None:
        """Before any weights load: every view has a camera, all views fit one batch, and one process holds them."""
        super().check_run(spec, views)
        if any("camera" not in v.context for v in views):
            raise ConfigError("tiler.name", "the mvdiffusion denoiser needs views with a camera; use the perspective "
                                            "tiler")
        c = spec.config
        if int(c.sampler.view_batch_size) < len(views):
            raise ConfigError("sampler.view_batch_size", f"is {c.sampler.view_batch_size}, but the mvdiffusion "
                              f"denoiser needs all {len(views)} views of a request in one batch; "
                              f"set it to {len(views)}")
        r = c.runtime
        devices = r.devices
        many = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, (int, str)) and len(devices) > 1)
        if r.shard == "windows" and (many or int(r.num_nodes) > 1):
            raise ConfigError("runtime.shard", "windows sharding would split the views that the mvdiffusion "
                              "denoiser attends across; use runtime.shard: requests (or one device)")

    @staticmethod
    def _check_one_batch(step: Step, views: Sequence[View], state: MVRequest) -> None:
        """Views of one step arriving in disjoint no-grad batches means the sampler split them: refuse."""
        index, seen = state.seen
        if index != step.index:
            index, seen = step.index, set()
        mine = {v.index for v in views}
        if seen and mine.isdisjoint(seen):
            raise ConfigError("sampler.view_batch_size", f"the mvdiffusion denoiser needs all views of a request in "
                              f"one batch, but views {sorted(seen)} and {sorted(mine)} came apart; set it to at least "
                              f"the number of views (and use one device or runtime.shard: requests)")
        state.seen = (index, frozenset(seen | mine))

    # --------------------------------------------------------------------------------------------------- inference

    def predict(self, latents: torch.Tensor, step: Step, conds: Sequence[Conditioning], views: Sequence[View],
                context: RequestContext = NO_CONTEXT) -> torch.Tensor:
        """Joint prediction of ``views``. Without a prepared request (``context`` lacks this denoiser's part, e.g.
        ``NO_CONTEXT``) it is a pure function of its arguments: ``conds`` as given (no view prompts) and no batch
        watch (which needs a per-request record of the step's batches); nothing is kept between calls."""
        state = self.request_state(context)
        if state is None:
            return super().predict(latents, step, conds, views, context)
        if not torch.is_grad_enabled():
            self._check_one_batch(step, views, state)
        return super().predict(latents, step, self._view_conds(conds, views, state), views, context)

    def unet_forward(self, latents: torch.Tensor, step: Step, hidden: torch.Tensor, views: Sequence[View],
                     cond_mask: torch.Tensor, context: RequestContext = NO_CONTEXT) -> torch.Tensor:
        self.blocks.plan = self.plan(views, cond_mask)
        return super().unet_forward(latents, step, hidden, views, cond_mask, context)

    def camera(self, view: View) -> Camera:
        camera = view.context.get("camera")
        if camera is None:
            raise ConfigError("tiler.name", f"the mvdiffusion denoiser needs views with a camera (context['camera'] "
                                            f"with yaw, pitch, roll, fov); view {view.index} has none: use the "
                                            f"perspective or cubemap tiler")
        h, w = view.latent_size
        return Camera.from_context(camera, h * self.latent_factor, w * self.latent_factor)

    def plan(self, views: Sequence[View], cond_mask: torch.Tensor) -> Plan:
        """The view groups of one UNet batch: the rows of each CFG branch, with their neighbours and homographies
        (cached by cameras, so the per-level neighbourhoods are computed once per run)."""
        cams = tuple(self.camera(v) for v in views)
        flags = tuple(bool(f) for f in cond_mask.tolist())
        key = (cams, flags, self.config.neighbors)
        if key not in self._plans:
            if len(self._plans) > 32:
                self._plans.clear()
            groups, caches = [], {}
            for flag in sorted(set(flags)):
                rows = [r for r, f in enumerate(flags) if f == flag]
                if len(rows) > 1:
                    if len({(cams[r].height, cams[r].width) for r in rows}) > 1:
                        raise ConfigError("tiler.window", "the mvdiffusion denoiser needs views of one size")
                    group_cams = [cams[r] for r in rows]
                    cache = caches.setdefault(tuple(group_cams), {})  # both CFG branches: one geometry
                    groups.append(view_group(rows, group_cams, self.config.neighbors, cache))
            self._plans[key] = Plan(len(views), groups)
        return self._plans[key]
