"""Calibrate a diffusers pipeline on its own sampling trajectory: each transformer at steps sampled from those it runs."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import inspect
import sys
from dataclasses import dataclass, field, replace

import torch

from .. import runtime
from ..adapters import adapter_for
from ..pipeline import call_inputs, pipeline_transformers
from ..pipeline_recipe import PipelineRecipe
from ..recipe import Recipe
from .config import CalibrationConfig
from .core import CalibrationResult, run_calibration
from .trajectory import detached, sample_steps

DEFAULT_STEPS = 4  # denoising steps calibrated per transformer


def load_pipeline(path_or_id, *, dtype: torch.dtype | None = None):
    """`DiffusionPipeline.from_pretrained(path_or_id, torch_dtype=dtype)`, also where `accelerate` is missing.

    Without `accelerate`, diffusers refuses to load models that keep some modules in float32 (Wan's time
    embedder and norms); they are then loaded whole in `dtype` and those modules cast back to float32.

    Example:
        >>> # pipe = load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16)
    """
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.utils import is_accelerate_available

    kw = {"torch_dtype": dtype} if dtype is not None else {}
    if is_accelerate_available():
        return DiffusionPipeline.from_pretrained(path_or_id, **kw)
    keep = {}
    for spec in DiffusionPipeline.load_config(path_or_id).values():
        cls = getattr(diffusers, spec[1], None) if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] else None
        if isinstance(cls, type) and getattr(cls, "_keep_in_fp32_modules", None):
            keep[cls] = ("_keep_in_fp32_modules" in cls.__dict__, cls._keep_in_fp32_modules)
    for cls in keep:
        cls._keep_in_fp32_modules = None
    try:
        pipe = DiffusionPipeline.from_pretrained(path_or_id, **kw)
    finally:
        for cls, (own, value) in keep.items():
            if own:
                cls._keep_in_fp32_modules = value
            else:
                del cls._keep_in_fp32_modules
    for comp in pipe.components.values():
        names = keep.get(type(comp), (False, None))[1]
        if names and dtype not in (None, torch.float32):
            for pname, p in comp.named_parameters():
                if any(n in pname for n in names):
                    p.data = p.data.float()
    return pipe


def encode_prompts(pipe, prompts, negative_prompt=None, *, device=None, max_sequence_length=None,
                   guidance: bool = True) -> list[dict]:
    """Per prompt, the pipeline call arguments that carry its text: the outputs of `pipe.encode_prompt`.

    `encode_prompt` returns its embedding parameters (those named `*_embeds` or `*_mask`), in the order of its
    `return` tuple (`_returned_embeddings`): `(prompt_embeds, negative_prompt_embeds)` for Wan and CogVideoX, which
    encode the negative prompt in the same call, as LTX-Video does with both prompts' attention masks,
    `(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)` for HunyuanVideo, whose negative
    prompt (used with `true_cfg_scale > 1`) is encoded by a second call into the `negative_*` arguments. The
    prompts are encoded once here, so the text encoders are not needed afterwards; a pipeline whose
    `encode_prompt` does not follow this gets the prompt strings and encodes them in every call.

    Example:
        >>> # encode_prompts(wan_pipe, ["a cat"])[0].keys()  -> dict_keys(['prompt_embeds', 'negative_prompt_embeds'])
        >>> # encode_prompts(hunyuan_pipe, ["a cat"])[0].keys()
        >>> #   -> dict_keys(['prompt_embeds', 'pooled_prompt_embeds', 'prompt_attention_mask'])
    """
    strings = [{"prompt": p, "negative_prompt": negative_prompt} for p in prompts]
    enc = getattr(pipe, "encode_prompt", None)
    if enc is None or getattr(pipe, "text_encoder", None) is None:
        return strings
    params = inspect.signature(enc).parameters
    accepted = set(inspect.signature(pipe.__call__).parameters)
    names = _returned_embeddings(enc, [n for n in params if n.endswith(("_embeds", "_mask"))])
    if "prompt" not in params or not names or not set(names) <= accepted:
        return strings
    joint = {"negative_prompt", "do_classifier_free_guidance"} <= set(params)
    negatives = [f"negative_{n}" for n in names]
    if not joint and negative_prompt is not None and not set(negatives) <= accepted:
        return strings
    kw = {"max_sequence_length": max_sequence_length} if max_sequence_length and "max_sequence_length" in params else {}
    if "device" in params:
        kw["device"] = device or pipe._execution_device
    _ftfy_fallback(pipe)
    out = []
    with torch.no_grad():
        for p in prompts:
            extra = {"negative_prompt": negative_prompt, "do_classifier_free_guidance": guidance} if joint else {}
            res = enc(prompt=[p], **extra, **kw)
            if not (isinstance(res, tuple) and len(res) == len(names)):
                return strings
            call = dict(zip(names, res))
            if not joint and negative_prompt is not None:
                call.update(zip(negatives, enc(prompt=[negative_prompt], **kw)))
            out.append(call)
    return out


def _returned_embeddings(enc, names: list[str]) -> list[str]:
    """The order in which `enc` returns its embedding parameters `names`: that of its `return` tuple where it
    returns exactly those variables (LTX-Video: `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
    negative_prompt_attention_mask)`, unlike its parameters' order), else the parameters' order.

    Example:
        >>> def enc(prompt, prompt_embeds=None, negative_prompt_embeds=None, prompt_attention_mask=None):
        ...     return prompt_embeds, prompt_attention_mask, negative_prompt_embeds
        >>> _returned_embeddings(enc, ["prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask"])
        ['prompt_embeds', 'prompt_attention_mask', 'negative_prompt_embeds']
    """
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(enc)))
    except (OSError, TypeError, SyntaxError):
        return names
    returned = [[e.id for e in r.value.elts if isinstance(e, ast.Name)] for r in ast.walk(tree)
                if isinstance(r, ast.Return) and isinstance(r.value, ast.Tuple)]
    orders = {tuple(r) for r in returned if sorted(r) == sorted(names)}
    return list(orders.pop()) if len(orders) == 1 else names


def _ftfy_fallback(pipe) -> None:
    """Without the optional `ftfy`, WanPipeline skips its text fix-up but diffusers 0.42's WanImageToVideoPipeline
    calls `ftfy.fix_text` regardless (NameError); give that module the same no-op fix-up WanPipeline uses then."""
    import importlib.util
    import types

    module = sys.modules.get(type(pipe).__module__)
    if module is not None and "ftfy" not in vars(module) and importlib.util.find_spec("ftfy") is None:
        module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def free_text_encoders(pipe) -> list[str]:
    """Drop the pipeline's text encoders (after `encode_prompts`) and return their component names."""
    names = [n for n, c in pipe.components.items() if n.startswith("text_encoder") and c is not None]
    for n in names:
        setattr(pipe, n, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return names


def transformer_steps(pipe, num_inference_steps: int) -> dict[str, list[int]]:
    """The denoising steps each transformer of the pipeline runs (Wan 2.2: split at `boundary_ratio`).

    Example:
        >>> # transformer_steps(wan22_pipe, 4)  -> {'transformer': [0, 1], 'transformer_2': [2, 3]}
    """
    found = list(pipeline_transformers(pipe))
    boundary = pipe.config.get("boundary_ratio") if hasattr(pipe.config, "get") else None
    every = list(range(num_inference_steps))
    if boundary is None or "transformer_2" not in found or "transformer" not in found:
        return {found[0]: every}
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(num_inference_steps, device="cpu")
    t_b = boundary * sched.config.num_train_timesteps
    ts = [float(t) for t in sched.timesteps]
    steps = {"transformer": [i for i, t in enumerate(ts) if t >= t_b],
             "transformer_2": [i for i, t in enumerate(ts) if t < t_b]}
    return {k: v for k, v in steps.items() if v}


@contextlib.contextmanager
def _no_progress_bar(pipe):
    """The pipeline's progress bar off inside the block, as it was after."""
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = bar_config


class _StepEnd(Exception):
    pass


def _first_step_calls(pipe, transformers: dict, kwargs: dict, seed: int) -> list[tuple]:
    """Run the pipeline's first denoising step and return its transformer calls `[(name, args, kwargs)]`."""
    seen = []

    def stop(pipe, i, t, callback_kwargs):
        raise _StepEnd

    hooks = [m.register_forward_pre_hook(functools.partial(_record_call, seen, name), with_kwargs=True)
             for name, m in transformers.items()]
    try:
        with torch.no_grad(), _no_progress_bar(pipe):
            pipe(**kwargs, generator=_generator(seed), callback_on_step_end=stop)
        raise RuntimeError(f"sparsify.calibrate: {type(pipe).__name__} ended without calling `callback_on_step_end`")
    except _StepEnd:
        pass
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise RuntimeError(f"sparsify.calibrate: {type(pipe).__name__} never called its transformer")
    return seen


def _record_call(seen, name, module, args, kwargs):
    seen.append((name, args, kwargs))


@dataclass
class PipelinePlan:
    """What a pipeline calibration runs: the prompts' call arguments, the steps, and the token grid.

    Attributes:
        pipe: the pipeline.
        calls: per prompt, the call arguments carrying its text (embeddings or prompt strings).
        common: the call arguments shared by every prompt (size, steps, guidance, image, ...).
        seed: the first prompt's generator seed (prompt i uses seed + i).
        transformers: `{component name: module}` of the transformers that run at least one step.
        steps: `{name: steps it runs}`; `sampled`: `{name: steps calibrated}`.
        grid: the latent token grid `(T, H, W)` of the generation.
        first_call: `(name, args, kwargs)` of the first transformer call of the generation (full size).
        branches: transformer calls per denoising step, counted on the first step: 2 where classifier-free
            guidance runs its branches as two calls (Wan), 1 where they share one batch (CogVideoX) or
            guidance is an embedding (HunyuanVideo).
        batch: the batch of those calls (2 for CogVideoX's batched guidance branches).
        settings: the generation settings recorded in the recipe's provenance.
    """

    pipe: object
    calls: list[dict]
    common: dict
    seed: int
    transformers: dict
    steps: dict[str, list[int]]
    sampled: dict[str, list[int]]
    grid: tuple[int, int, int]
    first_call: tuple
    branches: int
    batch: int = 1
    settings: dict = field(default_factory=dict)

    def forwards(self, name: str) -> int:
        """Transformer forwards of `name` that the calibration measures."""
        return len(self.sampled[name]) * len(self.calls) * self.branches

    def trajectory_forwards(self, name: str) -> int:
        """Transformer forwards of `name` in the whole trajectory (measured or not)."""
        return len(self.steps[name]) * len(self.calls) * self.branches


@dataclass
class PipelineCalibration:
    """The recipe of a pipeline calibration and each transformer's `CalibrationResult`."""

    recipe: Recipe | PipelineRecipe
    results: dict[str, CalibrationResult]
    plan: PipelinePlan


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _call_defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {k: params[k].default for k in ("height", "width", "num_frames") if k in params}


def plan_pipeline_calibration(pipe, prompts, *, negative_prompt=None, height=None, width=None, num_frames=None,
                              num_inference_steps: int = 50, guidance_scale: float = 5.0, steps: int = DEFAULT_STEPS,
                              dense_steps: int = 0, seed: int = 0, image=None, max_sequence_length=None,
                              free_text_encoder: bool = False, pipeline_kwargs: dict | None = None,
                              device=None) -> PipelinePlan:
    """Encode the prompts, find which steps each transformer runs and sample them, and probe the token grid.

    The probe runs the first denoising step of one generation: its transformer calls give the token grid and
    the calls per step (guidance as separate calls, as one batch or as an embedding).
    Steps below `dense_steps` (dense at run time) are not sampled. With a `device`, the text encoder goes
    there first and alone, and the rest of the pipeline follows once the prompts are encoded (and the
    text encoder dropped, with `free_text_encoder`): the two never share the device's memory.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"sparsify.calibrate: prompts must be a non-empty list of strings; got {prompts!r}")
    found = pipeline_transformers(pipe)
    if not found:
        raise ValueError(f"sparsify.calibrate: {type(pipe).__name__} has no transformer that sparsify knows (components: "
                         f"{', '.join(k for k, v in pipe.components.items() if v is not None)})")
    if device is not None:
        for n, comp in pipe.components.items():
            if n.startswith("text_encoder") and isinstance(comp, torch.nn.Module):
                comp.to(device)
    calls = encode_prompts(pipe, prompts, negative_prompt, max_sequence_length=max_sequence_length,
                           guidance=guidance_scale > 1.0, device=device)
    if free_text_encoder and "prompt_embeds" in calls[0]:
        free_text_encoders(pipe)
    if device is not None:
        pipe.to(device)
    common = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "output_type": "latent",
              **{k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v is not None},
              **({"image": image} if image is not None else {}), **(pipeline_kwargs or {})}
    if "prompt" in calls[0] and max_sequence_length and \
            "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        common.setdefault("max_sequence_length", max_sequence_length)  # the pipeline encodes the strings itself
    runs = transformer_steps(pipe, num_inference_steps)
    sampled = {n: sample_steps([s for s in st if s >= dense_steps] or st, steps) for n, st in runs.items()}
    step_calls = _first_step_calls(pipe, found, {**calls[0], **common}, seed)
    name, args, kwargs = step_calls[0]
    grid = tuple(_call_adapter(found[name], args, kwargs).geometry(found[name], args, kwargs).grid)
    latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    sizes = {**_call_defaults(pipe), **{k: common[k] for k in ("height", "width", "num_frames") if k in common}}
    settings = {"pipeline": type(pipe).__name__, "prompts": len(prompts),
                **{k: v for k, v in sizes.items() if isinstance(v, int)},
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "negative_prompt": negative_prompt, "seed": seed,
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]}
    if pipe.config.get("boundary_ratio") is not None:
        settings["boundary_ratio"] = pipe.config.get("boundary_ratio")
    return PipelinePlan(pipe=pipe, calls=calls, common=common, seed=seed,
                        transformers={n: found[n] for n in runs}, steps=runs, sampled=sampled, grid=grid,
                        first_call=step_calls[0], branches=len(step_calls), batch=int(latents.shape[0]),
                        settings=settings)


def _call_adapter(model, args, kwargs):
    """The model's family adapter, else the geometry inferred from the arguments of its call (LTX-Video)."""
    from ..adapters.infer import infer_adapter

    adapter = adapter_for(model) or infer_adapter(model, call_inputs(model, args, kwargs))
    if adapter is None:
        raise ValueError(f"sparsify.calibrate: no adapter knows {type(model).__name__} and its token grid could not "
                         "be inferred from the arguments of its call in the pipeline")
    return adapter


def _discovery_inputs(model, probe_args: tuple, probe_kwargs: dict) -> dict:
    """Small inputs of the model's family for site discovery, plus the probe's arguments the adapter does not make
    (e.g. Wan 2.1 I2V image embeddings, whose size does not depend on the grid); a model without a family adapter
    is discovered on the probe's own call (its geometry inferred from it)."""
    probe = call_inputs(model, probe_args, probe_kwargs)
    if adapter_for(model) is None:
        return probe
    small = adapter_for(model).example_inputs(model)
    return {**{k: v for k, v in probe.items() if k not in small}, **small}


def run_pipeline_calibration(plan: PipelinePlan, config: CalibrationConfig | None = None,
                             **overrides) -> PipelineCalibration:
    """Calibrate each transformer of `plan.pipe` on the real trajectory, at its sampled steps, and build the recipe.

    For each transformer the pipeline generates every prompt; the calibrator observes that transformer's
    attention calls (both guidance branches) only during its sampled steps, counted with the pipeline's
    `callback_on_step_end`. Its transformer calls at the middle sampled step of the first prompt are kept and
    replayed for the per-site model-output error. Checkpoints go to `<checkpoint_dir>/<component>/`.
    """
    config = (config or CalibrationConfig()).replace(**overrides)
    pipe = plan.pipe
    results = {}
    with _no_progress_bar(pipe):
        for name, model in plan.transformers.items():
            results[name] = _calibrate_one(plan, name, model, config)
    recipes = {}
    for name, res in results.items():
        cal = res.recipe.calibration
        cal.update({**plan.settings, "component": name, "grid": list(plan.grid), "steps_run": plan.steps[name],
                    "calibrated_steps": plan.sampled[name]})
        recipes[name] = res.recipe
    if len(pipeline_transformers(pipe)) == 1:
        recipe = next(iter(recipes.values()))
    else:
        recipe = PipelineRecipe(recipes, calibration={**plan.settings, "grid": list(plan.grid),
                                                      "budget": float(config.budget)})
    return PipelineCalibration(recipe=recipe, results=results, plan=plan)


def _calibrate_one(plan: PipelinePlan, name: str, model, config: CalibrationConfig) -> CalibrationResult:
    sampled = set(plan.sampled[name])
    record_step = plan.sampled[name][len(plan.sampled[name]) // 2]
    state = {"step": 0, "prompt": 0}
    records: list[dict] = []
    ran: set[int] = set()

    def record(module, args, kwargs):
        ran.add(state["step"])
        if state["step"] == record_step and state["prompt"] == 0:
            records.append((args, detached(kwargs)))

    def forward_loop(m):
        cap = runtime.STATE.observer

        def gate():  # the calibrator observes only the sampled steps
            runtime.STATE.observer = cap if state["step"] in sampled else None

        def on_step_end(pipe, i, t, kwargs):
            state["step"] = i + 1
            gate()
            return {}

        hook = m.register_forward_pre_hook(record, with_kwargs=True)
        records.clear()
        try:
            for n, call in enumerate(plan.calls):
                state.update(step=0, prompt=n)
                gate()
                plan.pipe(**call, **plan.common, generator=_generator(plan.seed + n), callback_on_step_end=on_step_end)
        finally:
            runtime.STATE.observer = cap
            hook.remove()
        missing = sorted(sampled - ran)
        if missing:
            raise RuntimeError(f"sparsify.calibrate: {name} was expected to run denoising steps {sorted(sampled)} but "
                               f"did not run {missing} (it ran {sorted(ran)})")

    def output_loop(m):
        for args, kwargs in records:
            m(*args, **kwargs)

    ckpt = config.checkpoint_dir
    cfg = config.replace(checkpoint_dir=None if ckpt is None else f"{ckpt}/{name}")
    if cfg.tiles is None or cfg.levels is None:
        tiles, levels = cfg.candidates(plan.grid)
        cfg = cfg.replace(tiles=tiles, levels=levels)
    inputs_hash = hashlib.sha256(repr((plan.settings, plan.grid, name, sorted(sampled),
                                       [sorted(c) for c in plan.calls])).encode()).hexdigest()[:16]
    if cfg.verbose:
        print(f"sparsify.calibrate: {name}: steps {sorted(sampled)} of {len(plan.steps[name])} it runs "
              f"({plan.steps[name][0]}..{plan.steps[name][-1]}), {len(plan.calls)} prompt(s) x {plan.branches} "
              f"transformer call(s) per step of batch {plan.batch}", file=sys.stderr)
    return run_calibration(model, forward_loop, cfg, example_inputs=_discovery_inputs(model, *plan.first_call[1:]),
                           n_forwards=plan.forwards(name), inputs_hash=inputs_hash, output_loop=output_loop)


def calibrate_pipeline_mask_reuse(plan: PipelinePlan, recipe, *, max_age: int = 4,
                                  max_error_growth: float | None = 0.05):
    """Calibrate temporal mask reuse of each transformer of `recipe` on the pipeline's own sampling trajectory.

    The trajectory is one generation of the first prompt at the plan's settings from other noise (seed + 1000),
    returning the final latents; `calibrate_mask_reuse` runs it dense, with fresh selection, then with reuse at
    candidate thresholds. With several transformers (Wan 2.2) each is calibrated in turn on the whole
    trajectory, the others dense, and its section gets its own threshold.

    Returns:
        `(recipe with mask_reuse set, {component: ReuseCalibration})`.

    Example:
        >>> # plan = plan_pipeline_calibration(pipe, ["a cat"]); cal = run_pipeline_calibration(plan, budget=0.1)
        >>> # recipe, found = calibrate_pipeline_mask_reuse(plan, cal.recipe)
    """
    from .reuse import calibrate_mask_reuse, with_mask_reuse

    pipe = plan.pipe

    def trajectory(model):
        return pipe(**plan.calls[0], **plan.common, generator=_generator(plan.seed + 1000)).frames

    sections = dict(recipe.transformers) if isinstance(recipe, PipelineRecipe) else {next(iter(plan.transformers)): recipe}
    found, done = {}, {}
    with _no_progress_bar(pipe):
        for name, section in sections.items():
            found[name] = calibrate_mask_reuse(plan.transformers[name], section, trajectory, max_age=max_age,
                                               max_error_growth=max_error_growth)
            done[name] = with_mask_reuse(section, found[name])
    if isinstance(recipe, PipelineRecipe):
        return replace(recipe, transformers=done), found
    return next(iter(done.values())), found


def calibrate_pipeline(pipe, prompts, budget: float = 0.1, *, negative_prompt=None, height=None, width=None,
                       num_frames=None, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                       steps: int = DEFAULT_STEPS, seed: int = 0, image=None, max_sequence_length=None,
                       free_text_encoder: bool = False, pipeline_kwargs: dict | None = None, device=None,
                       mask_reuse: bool = False, reuse_max_age: int = 4, reuse_max_growth: float = 0.05,
                       config: CalibrationConfig | None = None, **overrides) -> Recipe | PipelineRecipe:
    """Calibrate every transformer of a diffusers pipeline on its own sampling trajectory; return the recipe.

    The prompts are encoded once with the pipeline's text encoder, the pipeline samples each of them
    (classifier-free guidance included, latents only: the VAE does not decode), and each transformer is
    calibrated on the attention calls of the `steps` denoising steps sampled across those it runs. Wan 2.2
    A14B's `transformer` (high noise) and `transformer_2` (low noise) are calibrated on their own steps.

    Args:
        pipe: a diffusers pipeline whose transformer sparsify knows (Wan T2V/I2V and Wan 2.2, CogVideoX T2V/I2V,
            HunyuanVideo, LTX-Video, or any transformer whose grid is inferred from its calls), placed on its device.
        prompts: calibration prompts (a list of strings).
        budget: target attention density over all sparsifiable heads of each transformer.
        negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, image: as for
            the pipeline's `__call__` (None: the pipeline's default); `image` for image-to-video. HunyuanVideo
            embeds `guidance_scale` (one call per step); its two-branch guidance needs a negative prompt and
            `pipeline_kwargs={"true_cfg_scale": ...}`.
        steps: denoising steps calibrated per transformer, spread evenly over the steps it runs.
        seed: the first prompt's generator seed (prompt i uses seed + i).
        max_sequence_length: text length for `encode_prompt` (None: its default).
        free_text_encoder: drop the text encoder(s) from `pipe` once the prompts are encoded (saves memory).
        pipeline_kwargs: further `__call__` arguments.
        device: where to run the pipeline (None: where it is); the text encoder runs there before the rest.
        mask_reuse: also calibrate temporal mask reuse on the pipeline's trajectory (see
            `calibrate_pipeline_mask_reuse`): the largest drift threshold, with selections reused for at most
            `reuse_max_age` steps, whose final-latent error grows at most `reuse_max_growth` (0.05 = 5%).
        config: a `CalibrationConfig`; `**overrides` are its fields (e.g. `tiles=[(1, 8, 8)]`).

    Returns:
        A `Recipe` for a single-transformer pipeline, a `PipelineRecipe` (one section per transformer)
        otherwise; each records in `calibration` the grid, size, steps and settings it was calibrated at.
        Apply it with `sparsify_pipeline(pipe, recipe)` or `sparsify(pipe, recipe)`.

    Example:
        >>> # pipe = DiffusionPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers", torch_dtype=torch.bfloat16)
        >>> # recipe = calibrate_pipeline(pipe.to("cuda"), ["a cat surfing"], budget=0.1, num_inference_steps=40)
        >>> # recipe.save("wan22.yaml"); sparsify(pipe, recipe)
    """
    overrides = {"budget": budget, **overrides}
    cfg = (config or CalibrationConfig()).replace(**overrides)
    plan = plan_pipeline_calibration(pipe, prompts, negative_prompt=negative_prompt, height=height, width=width,
                                     num_frames=num_frames, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, steps=steps, dense_steps=cfg.dense_steps, seed=seed,
                                     image=image, max_sequence_length=max_sequence_length,
                                     free_text_encoder=free_text_encoder, pipeline_kwargs=pipeline_kwargs,
                                     device=device)
    recipe = run_pipeline_calibration(plan, cfg).recipe
    if mask_reuse:
        recipe, _ = calibrate_pipeline_mask_reuse(plan, recipe, max_age=reuse_max_age, max_error_growth=reuse_max_growth)
    return recipe
