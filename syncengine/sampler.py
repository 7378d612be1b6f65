"""The joint-diffusion loop: Algorithm 1 of SyncDiffusion on top of MultiDiffusion, stepping once on the canvas.

:meth:`JointSampler.sample` is Algorithm 1's ``DenoisingOneStep`` for every timestep; its comments give the line
numbers. Per step ``t`` (one :class:`StepState`):

1. on sync steps, each sync group's anchor x_t^0 is denoised and decoded once, without gradient: the loss target
   (line 2);
2. every view reads its x_t^i (line 9) and, on sync steps, each non-anchor view moves down the gradient of the
   perceptual loss between its decoded x0 prediction and the anchor's (lines 3-4, Eq. 14);
3. the denoiser predicts the noise at the updated latents (classifier-free guidance inside);
4. the merge target steps and averages (lines 13-15, Eqs. 11-12).

Two merge targets share that loop. :class:`XtMerge` (MultiDiffusion): the canvas holds x_t; the updated windows and
the predictions are averaged on it and the scheduler steps once there. For DDIM-like schedulers the step is linear in
(x_t, eps), so this equals stepping each view and averaging (the paper's order); stepping on the canvas lets every
diffusers scheduler work and draws stochastic noise once. :class:`X0Merge` (``merger.target: x0``, SyncTweedies,
Kim et al. 2024): each view keeps its own x_t and the canvas holds only the merged Tweedie estimate x0.

The views of a step come from the tiler's :class:`~syncengine.view_schedule.ViewSchedule` (:class:`StepViews`): the
same at every step for most tilers, new at every step for shifted windows (SpotDiffusion), whose anchor is the view
holding the anchor position at that step. Because the canvas holds x_t, a step's views need nothing from the last
step's views.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .collective import Collective
from .denoiser import NO_CONTEXT, Conditioning, Denoiser, RequestContext, Step
from .errors import ConfigError, SyncEngineError
from .merger import MergeBuffer, Merger
from .parameterization import NoiseLevel, ddim_step, is_flow_scheduler, model_output_of, noise_level, predicted_x0
from .schedulers import ALIASES
from .sync import SyncSchedule, decoded_x0, sync_gradient
from .sync_loss import SyncLoss
from .view_schedule import FixedViews, ViewSchedule, resolve_anchor
from .views import CanvasSpec, InputContext, View, plain

__all__ = ["JointSampler", "Request", "SamplerOptions", "SampleResult", "StepState", "StepViews", "resolve_anchor"]


@dataclass
class Request:
    """One image to make: prompts, seed and per-request plugin inputs."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    name: str = "image"
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = plain(self.inputs or {})  # the one conversion: plugins read plain dicts and lists


@dataclass
class SamplerOptions:
    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    view_batch_size: int = 1
    sync_batch_size: int | None = None
    anchor: int | str = "center"
    sync_resolution: int | None = None
    scheduler_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleResult:
    latents: torch.Tensor  # final canvas [1, C, H, W]
    stats: dict[str, Any]  # SamplerStats.to_dict()


X0_SCHEDULERS = ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler")
"""Schedulers the x0 merge target supports: deterministic first-order steps, a function of (x_t, x0) alone, so each
view can take its own with the merged x0 (DDIM; a rectified flow's Euler step is the same step in flow space)."""


def check_x0_scheduler(scheduler: str) -> None:
    """The rule for ``merger.target: x0``, for spec validation and for direct users of :class:`JointSampler`."""
    if ALIASES.get(scheduler, (scheduler,))[0] not in X0_SCHEDULERS:
        raise ConfigError("sampler.scheduler", f"merger.target x0 takes one DDIM step per view; {scheduler!r} "
                                               "cannot: use ddim (flow models: flow_euler) or merger.target xt")


def check_moving_views(schedule: ViewSchedule, target: str, anchor: int | str, syncing: bool) -> None:
    """The rules of views that move every step, for spec validation and for direct users of :class:`JointSampler`:
    ``merger.target: x0`` keeps each view's own x_t from step to step, and a view index names no anchor."""
    if not schedule.moving:
        return
    if target == "x0":
        raise ConfigError("merger.target", "x0 keeps each view's own x_t from step to step; this tiler's views move "
                                           "every step: use merger.target xt")
    if syncing and (isinstance(anchor, int) or str(anchor).isdigit()):
        raise ConfigError("sync.anchor", f"view index {anchor} names no view here: this tiler moves its views every "
                                         "step; use center, first or last")


def check_step_count(scheduler: Any, steps: int) -> None:
    """More steps than the model has trained timesteps (after the scheduler's offset) would index past its noise
    schedule deep inside diffusers; say so before sampling. Known only once the model's scheduler is loaded."""
    config = scheduler.config
    limit = int(config.get("num_train_timesteps", 0) or 0) - int(config.get("steps_offset", 0) or 0)
    if limit > 0 and steps > limit:
        raise ConfigError("sampler.steps", f"{steps} steps is more than this model's scheduler has timesteps "
                                           f"({limit}); use sampler.steps={limit} or fewer")


def check_anchor_index(anchor: int | str, views: Sequence[View]) -> None:
    """An anchor given as a view index must name a view (known only once the views are built; the spec's
    validation checks the names)."""
    if not isinstance(anchor, str) and all(v.index != int(anchor) for v in views):
        raise ConfigError("sync.anchor", f"view index {anchor} does not exist; views are 0..{len(views) - 1}")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class SamplerStats:
    """What one request cost; the sidecar's ``stats`` (:meth:`to_dict`, with the collective's counters)."""

    unet_views: int = 0  # UNet evaluations, one per view (guided), anchors and sync renders included
    sync_views: int = 0  # views moved by the sync update
    decodes: int = 0  # VAE decodes for the sync loss
    sync_steps: int = 0
    views: int = 0
    owned_views: int = 0  # this rank's share of ``views`` (window sharding)
    seconds_sync: float = 0.0
    seconds_denoise: float = 0.0  # the view batches, sync updates included

    def to_dict(self, collective: dict[str, Any]) -> dict[str, Any]:
        return {**asdict(self), **collective}


@dataclass
class StepViews:
    """The views of one step and what the sampler derives from them. Fixed views (most tilers): built once per
    request; views that move (``shifted``): built at every step, on every rank alike."""

    views: list[View]  # every view of the step, in order
    owned: list[View]  # this rank's balanced share of them (window sharding; all of them in one process)
    weights: torch.Tensor  # [1, 1, H, W]: the summed merge weights of every view (Eq. 12's denominator)
    groups: dict[Any, tuple[View, list[View]]]  # sync group -> (its anchor at this step, its views); empty: no sync
    conds: dict[int, Conditioning]  # per view index


@dataclass
class StepState:
    """What one denoising step of Algorithm 1 knows: shared by the loop, the sync update and the merge target."""

    step: Step
    level: NoiseLevel  # x_t = signal x0 + noise eps at t (alpha space, or a rectified flow's)
    weight: float  # w of Eq. 14 at this step; 0: no sync
    inputs: InputContext
    views: StepViews
    stats: SamplerStats
    context: RequestContext = NO_CONTEXT  # the request's conditioning from Denoiser.prepare_request, for every predict
    targets: dict[Any, Any] = field(default_factory=dict)  # per sync group: the anchor's loss target

    @property
    def syncing(self) -> bool:
        return self.weight > 0

    @property
    def conds(self) -> dict[int, Conditioning]:
        return self.views.conds


class XtMerge:
    """MultiDiffusion's merge target (Eq. 12): the canvas holds x_t. Views read windows of it; the synced windows
    x_hat_t^i and the predictions eps^i are averaged on the canvas, and the scheduler steps once there. For DDIM the
    step is linear in (x_t, eps), so this equals the paper's per-view step then average (lines 13-15)."""

    def __init__(self, sampler: JointSampler, scheduler: Any, noise: torch.Tensor, owned: list[View],
                 step_kwargs: dict[str, Any]):
        self.sampler, self.scheduler, self.step_kwargs = sampler, scheduler, step_kwargs
        self.device = sampler.denoiser.device
        self.latents = (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(self.device)  # flow: 1, no attribute

    def begin(self, s: StepState) -> None:
        # Views see the model's latents: identity for DDIM-like and flow schedulers, 1/sqrt(sigma^2+1) for Euler-like.
        self.scale = 1.0
        if hasattr(self.scheduler, "scale_model_input"):
            ones = torch.ones(1, device=self.device)
            self.scale = float(self.scheduler.scale_model_input(ones, s.step.timestep).reshape(-1)[0])
        self.model_canvas = self.latents * self.scale
        shape, weights = self.latents.shape, s.views.weights
        self.eps = MergeBuffer(shape, device=self.device, weight=weights)
        self.x_hat = MergeBuffer(shape, device=self.device, weight=weights) if s.syncing else None

    def read(self, view: View) -> torch.Tensor:
        """Line 9: x_t^i = T_{z->i}(z_t), the view's window of the canvas."""
        return view.extract(self.model_canvas)

    def add(self, batch: Sequence[View], windows: list, prepared: list, x: torch.Tensor, out: torch.Tensor,
            s: StepState) -> None:
        for k, view in enumerate(batch):
            w = self.sampler.merger.weight(view, device=self.device)
            self.eps.add(view, out[k : k + 1], w)
            if self.x_hat is not None:
                # The window moved by the sync update only: not what prepare_input composed around it.
                moved = x[k : k + 1] if prepared[k] is windows[k] else windows[k] + (x[k : k + 1] - prepared[k])
                self.x_hat.add(view, moved / self.scale, w)

    def step(self, s: StepState) -> None:
        self.sampler.collective.all_reduce_([self.eps.sum] + ([self.x_hat.sum] if self.x_hat is not None else []))
        # Eq. 12: z = sum_i T_i(w_i x^i) / sum_i T_i(w_i), for eps and x_hat_t; uncovered positions keep x_t, eps 0.
        eps = self.eps.result(torch.zeros_like(self.latents))
        x_hat = self.x_hat.result(self.latents) if self.x_hat is not None else self.latents
        # Eq. 11 on the canvas: z_{t-1} = S(x_hat_t, t, eps).
        self.latents = self.scheduler.step(eps, s.step.timestep, x_hat, **self.step_kwargs).prev_sample
        check_finite(self.latents, s.step.index, s.step.total)

    def result(self) -> torch.Tensor:
        return self.latents


class X0Merge:
    """SyncTweedies' merge target (Kim et al. 2024): each view keeps its own x_t^i and the canvas holds only the
    merged Tweedie estimate x0, so views that resample the canvas (projections) never see interpolated, hence
    variance-shrunk, noise. Each view then takes its own DDIM step from its (synced, prepared) x_t^i towards the merged
    x0 reprojected into it. On the last step the canvas takes that step itself, from the merged x_t^i: for views that
    read consistent windows (crops) every step then equals :class:`XtMerge`'s exactly, and the result is the merged x0
    up to the scheduler's final ``sqrt(alpha)`` factors. DDIM only (:func:`check_x0_scheduler`)."""

    def __init__(self, sampler: JointSampler, scheduler: Any, noise: torch.Tensor, owned: list[View],
                 step_kwargs: dict[str, Any]):
        self.sampler, self.scheduler, self.owned = sampler, scheduler, owned  # fixed views only (JointSampler)
        self.device = device = sampler.denoiser.device
        # Drawn once on the canvas; each view reads its own x_T so that it keeps unit variance (View.extract_noise).
        self.states = {v.index: v.extract_noise(noise.to(device)) for v in owned}
        self.zeros = torch.zeros(noise.shape, device=device)
        self.latents = self.zeros

    def begin(self, s: StepState) -> None:
        self.last = s.step.index == s.step.total - 1
        self.x0 = MergeBuffer(self.zeros.shape, device=self.device, weight=s.views.weights)
        self.xt = MergeBuffer(self.zeros.shape, device=self.device, weight=s.views.weights) if self.last else None
        self.current: dict[int, torch.Tensor] = {}

    def read(self, view: View) -> torch.Tensor:
        return self.states[view.index]

    def add(self, batch: Sequence[View], windows: list, prepared: list, x: torch.Tensor, out: torch.Tensor,
            s: StepState) -> None:
        with torch.no_grad():  # Tweedie: x0^i = (x_hat_t^i - sqrt(1 - a) eps^i) / sqrt(a), for epsilon prediction
            x0 = predicted_x0(out, x, s.level.to(x), self.sampler.denoiser.prediction_type)
        for k, view in enumerate(batch):
            w = self.sampler.merger.weight(view, device=self.device)
            self.x0.add(view, x0[k : k + 1], w)
            self.current[view.index] = x[k : k + 1].detach()
            if self.xt is not None:
                self.xt.add(view, self.current[view.index], w)

    def step(self, s: StepState) -> None:
        self.sampler.collective.all_reduce_([self.x0.sum] + ([self.xt.sum] if self.xt is not None else []))
        merged_x0 = self.x0.result(self.zeros)  # Eq. 12 on x0
        check_finite(merged_x0, s.step.index, s.step.total)  # merged and all-reduced: the same verdict on every rank
        if self.last:  # positions no view covered stay 0 (x0 = 0, x_t = 0)
            self.latents = self.own_step(merged_x0, self.xt.result(self.zeros), s)
            check_finite(self.latents, s.step.index, s.step.total)
            return
        with torch.no_grad():  # Eq. 11 per view: x_{t-1}^i = S(x_hat_t^i, t, eps(x_hat_t^i, T_{z->i}(x0)))
            for view in self.owned:
                self.states[view.index] = self.own_step(view.extract(merged_x0), self.current[view.index], s)

    def own_step(self, x0: torch.Tensor, x_t: torch.Tensor, s: StepState) -> torch.Tensor:
        """One view's step from x_t given x0: the scheduler's DDIM step, or a flow's Euler step (the same step in flow
        space, written out: diffusers' flow scheduler counts its calls, one per step, not one per view)."""
        if is_flow_scheduler(self.scheduler):
            return ddim_step(x0, x_t, s.level, NoiseLevel.flow(self.scheduler.sigmas[s.step.index + 1]))
        out = model_output_of(x0, x_t, s.level, self.scheduler.config.prediction_type)
        return self.scheduler.step(out, s.step.timestep, x_t).prev_sample

    def result(self) -> torch.Tensor:
        return self.latents


MERGE_STRATEGIES: dict[str, type] = {"xt": XtMerge, "x0": X0Merge}


class JointSampler:
    """Runs one request from noise to a final latent canvas.

    ``views``: a list (the same views at every step) or a :class:`~syncengine.view_schedule.ViewSchedule` from the
    tiler (``Tiler.view_schedule``), whose views may move from step to step."""

    def __init__(
        self,
        denoiser: Denoiser,
        views: Sequence[View] | ViewSchedule,
        merger: Merger,
        sync_loss: SyncLoss | None,
        schedule: SyncSchedule,
        options: SamplerOptions,
        collective: Collective | None = None,
    ):
        self.plan = views if isinstance(views, ViewSchedule) else FixedViews(views)
        if merger.target == "x0":
            check_x0_scheduler(options.scheduler)
        check_moving_views(self.plan, merger.target, options.anchor, sync_loss is not None)
        self.denoiser = denoiser
        self.views = self.plan.at(0)  # the first step's (all of them, for fixed views)
        self.merger = merger
        self.sync_loss = sync_loss
        self.schedule = schedule
        self.options = options
        self.collective = collective or Collective()
        if sync_loss is not None and not self.plan.moving:
            check_anchor_index(options.anchor, self.views)
        self.groups = self._sync_groups(self.views)  # the first step's

    def _sync_groups(self, views: Sequence[View]) -> dict[Any, tuple[View, list[View]]]:
        """Sync group -> (its anchor, its views). Moving views without a sync loss need none (every step would
        resolve anchors for nothing)."""
        if self.sync_loss is None and self.plan.moving:
            return {}
        groups: dict[Any, list[View]] = {}
        for view in views:
            key = view.context.get("sync_group", "default")
            if key is not None:
                groups.setdefault(key, []).append(view)
        return {key: (self.plan.anchor(self.options.anchor, members), members) for key, members in groups.items()}

    def _step_views(self, views: list[View], request: Request, prompts: dict, shape: tuple[int, ...]) -> StepViews:
        """What the sampler needs of one step's views. Fixed views: this rank's share merges into weights that are
        summed once and all-reduced (as every later step's sums). Moving views: every rank sums the weights of all
        views itself, so a moving step costs no extra collective."""
        owned = self.collective.owned(views)
        device = self.denoiser.device
        if self.plan.moving:
            weights = MergeBuffer.weights_of(views, self.merger, shape, device)
        else:
            weights = MergeBuffer.weights_of(owned, self.merger, shape, device)
            self.collective.all_reduce_([weights])
        groups = self.groups if views is self.views else self._sync_groups(views)
        return StepViews(views, owned, weights, groups, self._conditionings(request, views, prompts))

    # ------------------------------------------------------------------------------------------------ conditioning

    def _conditionings(self, request: Request, views: Sequence[View], cache: dict) -> dict[int, Conditioning]:
        """Each view's conditioning; identical prompts are encoded once per request (``cache``)."""
        out = {}
        for view in views:
            prompt = view.context.get("prompt", request.prompt)
            negative = view.context.get("negative_prompt", request.negative_prompt)
            key = (prompt, negative)
            if key not in cache:
                with torch.no_grad():
                    cache[key] = self.denoiser.encode_prompt(prompt, negative)
            scale = float(view.context.get("guidance_scale", self.options.guidance_scale))
            out[view.index] = Conditioning(cache[key], scale)
        return out

    # ---------------------------------------------------------------------------------------------------- sampling

    def initial_noise(self, canvas: CanvasSpec, seed: int) -> torch.Tensor:
        """Drawn once for the whole canvas from a CPU generator: identical across devices, batch sizes, shards."""
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn(canvas.latent_shape(), generator=generator, dtype=torch.float32)

    def _scheduler(self, request: Request) -> tuple[Any, dict[str, Any]]:
        """The request's scheduler with its timesteps set, and the extra ``step`` arguments it takes: stochastic
        schedulers draw from a CPU generator seeded by the request (reproducible across devices)."""
        opts = self.options
        scheduler = self.denoiser.make_scheduler(opts.scheduler, **opts.scheduler_options)
        check_step_count(scheduler, opts.steps)
        self.denoiser.set_timesteps(scheduler, opts.steps, self.views)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = torch.Generator("cpu").manual_seed(int(request.seed) + 1)
        return scheduler, step_kwargs

    def sample(
        self,
        request: Request,
        canvas: CanvasSpec,
        progress: Callable[[int, int], None] | None = None,
        noise: torch.Tensor | None = None,
        context: RequestContext = NO_CONTEXT,
    ) -> SampleResult:
        """Algorithm 1's DenoisingOneStep for every timestep. ``noise`` replaces the request's initial canvas noise
        (default: :meth:`initial_noise` of its seed); ``context`` is what ``denoiser.prepare_request`` returned for
        the request, passed to every prediction."""
        scheduler, step_kwargs = self._scheduler(request)
        if noise is None:
            noise = self.initial_noise(canvas, request.seed)
        prompts: dict[tuple[str, str], Any] = {}
        # Fixed views: their weights, shares and groups hold for every step (computed once); moving ones per step.
        layout = self._step_views(self.views, request, prompts, tuple(noise.shape))
        stats = SamplerStats(views=len(layout.views), owned_views=len(layout.owned))
        target = MERGE_STRATEGIES[self.merger.target](self, scheduler, noise.float(), layout.owned, step_kwargs)
        on_views = _views_callback(progress)
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            if self.plan.moving and i > 0:
                layout = self._step_views(self.plan.at(i), request, prompts, tuple(noise.shape))
            owned = layout.owned
            batches = -(-len(owned) // self.options.view_batch_size)
            step = Step(i, len(timesteps), t)
            level = noise_level(scheduler, i, t)
            weight = self.schedule.weight_at(i) if self.sync_loss is not None else 0.0
            s = StepState(step, level, weight, InputContext(step, level, self.denoiser, int(request.seed)), layout,
                          stats, context=context)
            target.begin(s)
            if s.syncing:  # line 2: the anchor x_t^0 stays; D(phi(x_t^0, t)) is the loss target, once, without gradient
                s.targets = self._anchor_targets(target.read, s)
            t0 = time.perf_counter()
            for b, batch in enumerate(_batches(owned, self.options.view_batch_size)):
                windows = [target.read(view) for view in batch]  # x_t^i
                prepared = [view.prepare_input(x, s.inputs) for view, x in zip(batch, windows)]
                x = torch.cat(prepared)
                if s.syncing:  # lines 3-4: x_hat_t^i = x_t^i - w grad L(D(phi(x_t^i, t)), D(phi(x_t^0, t)))  (Eq. 14)
                    ts = time.perf_counter()
                    x = self._sync_update(x, batch, s)
                    stats.seconds_sync += time.perf_counter() - ts
                out = self._predict(x, batch, s)  # eps_theta(x_hat_t^i, t), classifier-free guided
                target.add(batch, windows, prepared, x, out, s)
                if on_views is not None:
                    on_views(b + 1, batches)
            stats.seconds_denoise += time.perf_counter() - t0
            if s.syncing:
                stats.sync_steps += 1
            target.step(s)  # lines 13-15: x_{t-1}^i = S(x_hat_t^i, t, eps^i), then MultiDiffusion's average (Eq. 12)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return SampleResult(target.result(), stats.to_dict(self.collective.stats))

    def _predict(self, x: torch.Tensor, batch: Sequence[View], s: StepState) -> torch.Tensor:
        """The denoiser's output at the (synced) latents of one view batch, without gradient."""
        with torch.no_grad():
            out = self.denoiser.predict(x, s.step, [s.conds[v.index] for v in batch], batch, s.context).float()
        s.stats.unet_views += len(batch)
        return out

    # -------------------------------------------------------------------------------------------------------- sync

    def _anchor_targets(self, read: Callable[[View], torch.Tensor], s: StepState) -> dict[Any, Any]:
        """Per sync group, the loss target of the anchor's decoded x0 (computed by its owner once, without gradient,
        and broadcast). ``read`` gives a view's current x_t (its canvas window, or its own state when merging x0)."""
        targets = {}
        device = self.denoiser.device
        views = s.views.views
        for key, (anchor, members) in s.views.groups.items():
            position = next(p for p, v in enumerate(views) if v is anchor)
            owner = self.collective.owner_of(position, len(views))
            image = torch.zeros(self._anchor_image_shape(anchor), device=device)
            if owner == self.collective.rank:
                with torch.no_grad():
                    x = anchor.prepare_input(read(anchor), s.inputs)
                    image = decoded_x0(self.denoiser, x, s.step, [s.conds[anchor.index]], [anchor], s.level,
                                       self.options.sync_resolution, s.context).float()
                s.stats.decodes += 1
                s.stats.unet_views += 1
            image = self.collective.broadcast_(image, owner)
            with torch.no_grad():
                targets[key] = self.sync_loss.prepare_target(image)
        return targets

    def _anchor_image_shape(self, anchor: View) -> tuple[int, int, int, int]:
        h, w = self.denoiser.sync_image_size(tuple(anchor.latent_size))
        r = self.options.sync_resolution
        if r is not None and min(h, w) != r:
            h, w = round(h * r / min(h, w)), round(w * r / min(h, w))
        return (1, 3, h, w)

    def _sync_update(self, x: torch.Tensor, batch: Sequence[View], s: StepState) -> torch.Tensor:
        """Algorithm 1 lines 2-4 for one view batch: the anchor and unsynced views keep x_t; every other view
        x_hat_t^i = x_t^i - w * grad_{x_t^i} L(D(phi(x_t^i, t)), target of its group's anchor)  (Eq. 14)."""
        picks = [k for k, view in enumerate(batch) if self._synced(view, s)]
        if not picks:
            return x
        x = x.clone()
        size = self.options.sync_batch_size or len(picks)
        for chunk in _batches(picks, size):
            views = [batch[k] for k in chunk]
            view_conds = [s.conds[v.index] for v in views]

            def render(lat, views=views, view_conds=view_conds):  # D(phi(x_t^i, t))
                return decoded_x0(self.denoiser, lat, s.step, view_conds, views, s.level, self.options.sync_resolution,
                                  s.context)

            idx = torch.tensor(chunk, device=x.device)
            group_targets = [s.targets[v.context.get("sync_group", "default")] for v in views]
            grad, _ = sync_gradient(self.sync_loss, render, x.index_select(0, idx), group_targets)
            x = x.index_copy(0, idx, x.index_select(0, idx) - s.weight * grad.to(x.dtype))  # line 4
            s.stats.sync_views += len(chunk)
            s.stats.unet_views += len(chunk)
            s.stats.decodes += len(chunk)
        return x

    def _synced(self, view: View, s: StepState) -> bool:
        """Whether the sync update moves ``view``: it is in a sync group and not that group's anchor (line 2)."""
        key = view.context.get("sync_group", "default")
        return key is not None and key in s.targets and s.views.groups[key][0] is not view


def check_finite(x: torch.Tensor, step: int, steps: int) -> None:
    """NaN/inf latents decode to a black image: fail the request at the step they appear instead (one reduction
    per step, negligible next to the step's UNet calls)."""
    if not bool(torch.isfinite(x).all()):
        raise SyncEngineError(f"latents became non-finite at step {step + 1}/{steps}; lower sync.weight / "
                              "guidance_scale or use float32 (denoiser.dtype=float32)")


def _views_callback(progress) -> Callable[[int, int], None] | None:
    """Within-step progress, if the step callback has it: ``progress.views(done, total)`` after each view batch
    (a step over hundreds of views of a huge canvas runs for minutes)."""
    return getattr(progress, "views", None)

