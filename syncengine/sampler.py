"""The joint-diffusion loop: Algorithm 1 of SyncDiffusion on top of MultiDiffusion, stepping once on the canvas.

Per step ``t``:
1. every view reads its window from the canvas;
2. on sync steps, each non-anchor view moves down the gradient of the perceptual loss between its decoded x0
   prediction and the anchor's (the anchor's side computed once, without gradient);
3. the denoiser predicts the noise at the updated windows (classifier-free guidance inside);
4. the merger averages the updated windows and the predictions on the canvas, and the scheduler steps once there.
For DDIM-like schedulers the step is linear in (x_t, eps), so step 4 equals stepping each view and averaging (the
paper's order); stepping on the canvas lets every diffusers scheduler work and draws stochastic noise once.

With ``merger.target: x0`` (SyncTweedies, Kim et al. 2024) each view instead keeps its own x_t, and the canvas holds
only the merged Tweedie estimate x0: views that resample the canvas (projections) then never see interpolated, hence
variance-shrunk, noise. See :meth:`JointSampler._sample_x0`.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .collective import Collective
from .denoiser import Conditioning, Denoiser, Step
from .errors import ConfigError, SyncEngineError
from .merger import MergeBuffer, Merger
from .parameterization import alpha_bar, predicted_x0
from .schedulers import ALIASES
from .sync import SyncSchedule, decoded_x0, sync_gradient
from .sync_loss import SyncLoss
from .views import CanvasSpec, InputContext, View


@dataclass
class Request:
    """One image to make: prompts, seed and per-request plugin inputs."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    name: str = "image"
    inputs: dict[str, Any] = field(default_factory=dict)


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
    stats: dict[str, Any]


X0_SCHEDULERS = ("DDIMScheduler",)
"""Schedulers the x0 merge target supports: deterministic and stateless in alpha space, so a step is a function of
(x_t, x0) alone and each view can take its own with the merged x0."""


def check_step_count(scheduler: Any, steps: int) -> None:
    """More steps than the model has trained timesteps (after the scheduler's offset) would index past its noise
    schedule deep inside diffusers; say so before sampling. Known only once the model's scheduler is loaded."""
    config = scheduler.config
    limit = int(config.get("num_train_timesteps", 0) or 0) - int(config.get("steps_offset", 0) or 0)
    if limit > 0 and steps > limit:
        raise ConfigError("sampler.steps", f"{steps} steps is more than this model's scheduler has timesteps "
                                           f"({limit}); use sampler.steps={limit} or fewer")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def resolve_anchor(anchor: int | str, members: Sequence[View]) -> View:
    """The anchor among a sync group's views: ``center`` (paper: N // 2), ``first``, ``last`` or a view index (groups
    that do not hold that view use their centre; an index no group holds is an error, see :class:`JointSampler`)."""
    if anchor == "center":
        return members[len(members) // 2]
    if anchor == "first":
        return members[0]
    if anchor == "last":
        return members[-1]
    for view in members:
        if view.index == int(anchor):
            return view
    return members[len(members) // 2]  # a group without that view (region layouts): its centre


class JointSampler:
    """Runs one request from noise to a final latent canvas."""

    def __init__(
        self,
        denoiser: Denoiser,
        views: Sequence[View],
        merger: Merger,
        sync_loss: SyncLoss | None,
        schedule: SyncSchedule,
        options: SamplerOptions,
        collective: Collective | None = None,
    ):
        if merger.target not in ("xt", "x0"):
            raise ConfigError("merger.target", f"{merger.target!r} is not 'xt' or 'x0'")
        if merger.target == "x0" and ALIASES.get(options.scheduler, (options.scheduler,))[0] not in X0_SCHEDULERS:
            raise ConfigError("sampler.scheduler", f"merger.target x0 takes one DDIM step per view and needs a "
                                                   f"deterministic alpha-space scheduler ('ddim'), got "
                                                   f"{options.scheduler!r}; use 'ddim' or merger.target xt")
        self.denoiser = denoiser
        self.views = list(views)
        self.merger = merger
        self.sync_loss = sync_loss
        self.schedule = schedule
        self.options = options
        self.collective = collective or Collective()
        self.groups = self._sync_groups()
        anchor = options.anchor
        if not isinstance(anchor, str) and sync_loss is not None and all(v.index != int(anchor) for v in self.views):
            raise ConfigError("sync.anchor", f"view index {anchor} does not exist; views are 0..{len(self.views) - 1}")

    def _sync_groups(self) -> dict[Any, tuple[View, list[View]]]:
        groups: dict[Any, list[View]] = {}
        for view in self.views:
            key = view.context.get("sync_group", "default")
            if key is not None:
                groups.setdefault(key, []).append(view)
        return {key: (resolve_anchor(self.options.anchor, members), members) for key, members in groups.items()}

    # ------------------------------------------------------------------------------------------------ conditioning

    def _conditionings(self, request: Request) -> dict[int, Conditioning]:
        """Each view's conditioning; identical prompts are encoded once."""
        cache: dict[tuple[str, str], Any] = {}
        out = {}
        for view in self.views:
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

    def sample(
        self,
        request: Request,
        canvas: CanvasSpec,
        progress: Callable[[int, int], None] | None = None,
        noise: torch.Tensor | None = None,
    ) -> SampleResult:
        """``noise`` replaces the request's initial canvas noise (default: :meth:`initial_noise` of its seed)."""
        den = self.denoiser
        device = den.device
        opts = self.options
        scheduler = den.make_scheduler(opts.scheduler, **opts.scheduler_options)
        check_step_count(scheduler, opts.steps)
        scheduler.set_timesteps(opts.steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = torch.Generator("cpu").manual_seed(int(request.seed) + 1)
        alphas = scheduler.alphas_cumprod.to(torch.float32)

        conds = self._conditionings(request)
        owned = self.collective.owned(self.views)
        if noise is None:
            noise = self.initial_noise(canvas, request.seed)
        stats = {"unet_views": 0, "sync_views": 0, "decodes": 0, "sync_steps": 0, "views": len(self.views),
                 "owned_views": len(owned), "seconds_sync": 0.0, "seconds_denoise": 0.0}
        # The merge weights never change within a request: summed (and all-reduced) once, shared by every step.
        weights = MergeBuffer.weights_of(owned, self.merger, tuple(noise.shape), device)
        self.collective.all_reduce_([weights])
        if self.merger.target == "x0":
            latents = self._sample_x0(request, scheduler, conds, owned, noise.float(), weights, stats, progress)
            stats.update(self.collective.stats)
            return SampleResult(latents, stats)
        latents = (noise.float() * scheduler.init_noise_sigma).to(device)
        timesteps = scheduler.timesteps
        on_views = _views_callback(progress)
        batches = -(-len(owned) // opts.view_batch_size)
        for i, t in enumerate(timesteps):
            step = Step(i, len(timesteps), t)
            weight = self.schedule.weight_at(i) if self.sync_loss is not None else 0.0
            # Views see alpha-space latents: identity for DDIM-like schedulers, 1/sqrt(sigma^2+1) for Euler-like.
            scale = float(scheduler.scale_model_input(torch.ones(1, device=device), t).reshape(-1)[0])
            model_canvas = latents * scale
            a = alpha_bar(alphas, t)
            inputs = InputContext(step, a, den, int(request.seed))
            read = lambda view: view.extract(model_canvas)  # noqa: E731
            targets = self._anchor_targets(read, step, conds, a, inputs, stats) if weight > 0 else {}

            eps_buf = MergeBuffer(latents.shape, device=device, weight=weights)
            x_buf = MergeBuffer(latents.shape, device=device, weight=weights) if weight > 0 else None
            t0 = time.perf_counter()
            for b, batch in enumerate(_batches(owned, opts.view_batch_size)):
                read_x = [v.extract(model_canvas) for v in batch]
                prepared = [v.prepare_input(r, inputs) for v, r in zip(batch, read_x)]
                x, out = self._update_and_predict(torch.cat(prepared), batch, step, conds, targets, weight, a, stats)
                for k, view in enumerate(batch):
                    w = self.merger.weight(view, device=device)
                    eps_buf.add(view, out[k : k + 1], w)
                    if x_buf is not None:  # the window moved by the sync update (not what prepare_input composed)
                        moved = x[k : k + 1] if prepared[k] is read_x[k] else read_x[k] + (x[k : k + 1] - prepared[k])
                        x_buf.add(view, moved / scale, w)
                if on_views is not None:
                    on_views(b + 1, batches)
            stats["seconds_denoise"] += time.perf_counter() - t0
            buffers = [eps_buf.sum] + ([x_buf.sum] if x_buf is not None else [])
            self.collective.all_reduce_(buffers)
            model_out = eps_buf.result(torch.zeros_like(latents))
            current = x_buf.result(latents) if x_buf is not None else latents
            if weight > 0:
                stats["sync_steps"] += 1
            latents = scheduler.step(model_out, t, current, **step_kwargs).prev_sample
            check_finite(latents, i, len(timesteps))
            if progress is not None:
                progress(i + 1, len(timesteps))
        stats.update(self.collective.stats)
        return SampleResult(latents, stats)

    def _sample_x0(self, request, scheduler, conds, owned, noise, weights, stats, progress) -> torch.Tensor:
        """SyncTweedies' x0 merging; returns the final canvas. Per step, for each owned view i with its own x_t^i:
        prepare its input and sync-update it (as the x_t path does), predict eps^i, form Tweedie x0^i, and merge the
        x0^i on the canvas (one all-reduced buffer). Each view then takes its own DDIM step from x_t^i towards the
        merged x0 reprojected into it, with the noise that pair implies. On the last step the canvas takes that step
        itself, from the merged x_t^i: for views that read consistent windows (crops) every step then equals the x_t
        path's exactly, and the result is the merged x0 up to the scheduler's final ``sqrt(alpha)`` factors."""
        den, device, opts = self.denoiser, self.denoiser.device, self.options
        if type(scheduler).__name__ not in X0_SCHEDULERS:
            raise ConfigError("sampler.scheduler", f"merger.target x0 needs one of {', '.join(X0_SCHEDULERS)}, got "
                                                   f"{type(scheduler).__name__}")
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        ptype = scheduler.config.prediction_type
        # Drawn once on the canvas; each view reads its own x_T so that it keeps unit variance (View.extract_noise).
        states = {v.index: v.extract_noise(noise.to(device)) for v in owned}
        zeros = torch.zeros(noise.shape, device=device)
        timesteps = scheduler.timesteps
        latents = zeros
        on_views = _views_callback(progress)
        batches = -(-len(owned) // opts.view_batch_size)
        for i, t in enumerate(timesteps):
            step = Step(i, len(timesteps), t)
            weight = self.schedule.weight_at(i) if self.sync_loss is not None else 0.0
            a = alpha_bar(alphas, t)
            inputs = InputContext(step, a, den, int(request.seed))
            read = lambda view: states[view.index]  # noqa: E731
            targets = self._anchor_targets(read, step, conds, a, inputs, stats) if weight > 0 else {}
            last = i == len(timesteps) - 1
            x0_buf = MergeBuffer(zeros.shape, device=device, weight=weights)
            xt_buf = MergeBuffer(zeros.shape, device=device, weight=weights) if last else None
            current: dict[int, torch.Tensor] = {}
            t0 = time.perf_counter()
            for b, batch in enumerate(_batches(owned, opts.view_batch_size)):
                x = torch.cat([v.prepare_input(states[v.index], inputs) for v in batch])
                x, out = self._update_and_predict(x, batch, step, conds, targets, weight, a, stats)
                with torch.no_grad():
                    x0 = predicted_x0(out, x, a.to(device), den.prediction_type)
                for k, view in enumerate(batch):
                    w = self.merger.weight(view, device=device)
                    x0_buf.add(view, x0[k : k + 1], w)
                    current[view.index] = x[k : k + 1].detach()
                    if xt_buf is not None:
                        xt_buf.add(view, current[view.index], w)
                if on_views is not None:
                    on_views(b + 1, batches)
            stats["seconds_denoise"] += time.perf_counter() - t0
            buffers = [x0_buf.sum] + ([xt_buf.sum] if xt_buf is not None else [])
            self.collective.all_reduce_(buffers)
            if weight > 0:
                stats["sync_steps"] += 1
            merged_x0 = x0_buf.result(zeros)
            check_finite(merged_x0, i, len(timesteps))  # merged and all-reduced: the same verdict on every rank
            if last:  # positions no view covered stay 0 (x0 = 0, x_t = 0)
                xt = xt_buf.result(zeros)
                latents = scheduler.step(_model_output(merged_x0, xt, a, ptype), t, xt).prev_sample
                check_finite(latents, i, len(timesteps))
            else:
                with torch.no_grad():
                    for view in owned:
                        x_t = current[view.index]
                        out = _model_output(view.extract(merged_x0), x_t, a, ptype)
                        states[view.index] = scheduler.step(out, t, x_t).prev_sample
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    def _update_and_predict(self, x, batch, step, conds, targets, weight, a, stats):
        """One view batch: the sync update on sync steps, then the model output at the updated latents."""
        if weight > 0:
            ts = time.perf_counter()
            x = self._sync_update(x, batch, step, conds, targets, weight, a, stats)
            stats["seconds_sync"] += time.perf_counter() - ts
        with torch.no_grad():
            out = self.denoiser.predict(x, step, [conds[v.index] for v in batch], batch).float()
        stats["unet_views"] += len(batch)
        return x, out

    # -------------------------------------------------------------------------------------------------------- sync

    def _anchor_targets(self, read, step, conds, a, inputs, stats) -> dict[Any, Any]:
        """Per sync group, the loss target of the anchor's decoded x0 (computed once, without gradient). ``read``
        gives a view's current x_t (its canvas window, or its own state when merging x0)."""
        targets = {}
        device = self.denoiser.device
        for key, (anchor, members) in self.groups.items():
            position = next(p for p, v in enumerate(self.views) if v is anchor)
            owner = self.collective.owner_of(position, len(self.views))
            image = torch.zeros(self._anchor_image_shape(anchor), device=device)
            if owner == self.collective.rank:
                with torch.no_grad():
                    x = anchor.prepare_input(read(anchor), inputs)
                    image = decoded_x0(self.denoiser, x, step, [conds[anchor.index]], [anchor], a, self.options.sync_resolution).float()
                stats["decodes"] += 1
                stats["unet_views"] += 1
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

    def _sync_update(self, x, batch, step, conds, targets, weight, a, stats) -> torch.Tensor:
        """x_hat = x - w * grad L(D(x0(x)), D(x0(x_anchor))) for the batch's non-anchor, synced views (Eq. 14)."""
        picks = []
        for k, view in enumerate(batch):
            key = view.context.get("sync_group", "default")
            if key is None or key not in targets or self.groups[key][0] is view:
                continue
            picks.append(k)
        if not picks:
            return x
        x = x.clone()
        size = self.options.sync_batch_size or len(picks)
        for chunk in _batches(picks, size):
            views = [batch[k] for k in chunk]
            view_conds = [conds[v.index] for v in views]

            def render(lat, views=views, view_conds=view_conds):
                return decoded_x0(self.denoiser, lat, step, view_conds, views, a, self.options.sync_resolution)

            idx = torch.tensor(chunk, device=x.device)
            group_targets = [targets[v.context.get("sync_group", "default")] for v in views]
            grad, _ = sync_gradient(self.sync_loss, render, x.index_select(0, idx), group_targets)
            x = x.index_copy(0, idx, x.index_select(0, idx) - weight * grad.to(x.dtype))
            stats["sync_views"] += len(chunk)
            stats["unet_views"] += len(chunk)
            stats["decodes"] += len(chunk)
        return x


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


def _model_output(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The model output that a scheduler of ``prediction_type`` reads as the pair (x_t, x0): the implied noise is
    ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)``."""
    a = a.to(device=x_t.device, dtype=x_t.dtype)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")
