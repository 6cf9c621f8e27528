"""A run session: options in -> prepare (objective, backend, run folder) -> execute -> record.

:func:`generate` is the Python API behind ``scripts/generate.py`` (re-exported by
:mod:`generators.runs`). It merges option defaults, a preset, a config file and keyword arguments
(:mod:`generators.runs.options`), builds the objective from the guidance options (:mod:`guidance.build`)
and the backend from its ``Settings``, runs it with a progress bar, scores the result with an
evaluation CLIP and writes a new run folder (:mod:`generators.runs.outputs`). Ctrl-C (or SIGTERM) during the run keeps
the current image: it is saved, marked ``interrupted``; so does setting the ``stop`` event (a web UI's
Stop button, or any other thread).
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import secrets
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from guidance.build import build_objective, build_schedule, clip_specs, eval_model_for, reward_specs, score_images
from guidance.errors import first_line
from guidance.objective import ConditioningOnly
from guidance.runtime import set_compiled

from .. import get_generator_class
from ..base import GenerationResult, StepInfo, check_seed
from .logs import quiet_libraries
from .memory import check_fits
from .options import backend_settings, resolve_options
from .progress import CtrlC, Progress
from .record import RunRecord
from .seeds import each_seed, use_seeds


@dataclass
class Run:
    """What :func:`generate` returns: the images, where they were saved and what produced them.

    ``path`` is the run folder (``None`` with ``save=False``); ``image_paths`` the PNGs in it.
    ``images`` is a ``[B,3,H,W]`` tensor in ``[0,1]``, or with ``generate(..., output_type="pil")`` a list of
    PIL images as diffusers returns them; ``pil_images`` is that list either way.
    """

    images: torch.Tensor | list
    record: RunRecord
    path: Path | None = None
    image_paths: list[Path] = field(default_factory=list)
    clip_score: float | None = None
    interrupted: bool = False
    frames: list = field(default_factory=list, repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """The run's record as run.json has it."""
        return self.record.to_dict()

    @property
    def pil_images(self) -> list:
        from .outputs import to_pil

        return list(self.images) if isinstance(self.images, list) else to_pil(self.images)

    @property
    def image(self):
        """The (first) final image as a PIL image."""
        return self.pil_images[0]

    @property
    def image_path(self) -> Path | None:
        return self.image_paths[0] if self.image_paths else None

    @property
    def seed(self) -> int:
        return self.record.seed

    @property
    def losses(self) -> list[float]:
        return self.record.losses


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}  # with its CUDA/CPU build tag
    for dist in ("clipsteer", "transformers", "diffusers", "taming-transformers-rom1504", "kornia",
                 "open_clip_torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "clipsteer":
                out[dist] = "source checkout"
    return out


def _prompt_label(opts: Mapping[str, Any], schedule) -> str:
    if opts.get("prompt"):
        return str(opts["prompt"])
    if opts.get("story"):
        return str(opts["story"]) if isinstance(opts["story"], str) else "; ".join(
            f"{k}={v}" for k, v in dict(opts["story"]).items())
    if schedule is not None:
        return "|".join(p.label for p in schedule.at(0))
    return ""


def generate(prompt: str | None = None, *, backend: str | None = None, preset: str | None = None,
             config: str | Path | Mapping | None = None, save: bool = True, callback: Callable | None = None,
             resume: str | Path | None = None, stop=None, from_: str | Path | None = None,
             seeds: Any = None, keep_inputs: bool = False, **options) -> Run:
    """Generate image(s) for *prompt* and (with ``save=True``) write a new run folder.

    Args:
        prompt: ``"a lighthouse at dusk:1|fog:0.5"`` (or use ``story=``/``image_prompts=``).
        backend: a registered backend name (``generators.backend_names()``); default ``"vqgan"``.
        preset: a named preset (``"toy"``) giving defaults.
        config: a YAML/TOML file (or a dict) of options; keyword options override it.
        save: write the run folder under ``out`` (default ``outputs/``).
        callback: called with each :class:`StepInfo`; return ``False`` to stop early.
        resume: a run folder with a checkpoint (:mod:`generators.runs.checkpoint`): continue that run, with its
            own options, in a new run folder (under ``out``, default: beside it); only ``iterations``,
            ``out``, ``progress``, ``threads``, ``device`` and ``checkpoint_every`` may be given.
        stop: a ``threading.Event`` (anything with ``is_set()``); once it is set, the run ends at its
            next step exactly as Ctrl-C ends it: the current image is kept and saved, marked ``interrupted``.
        from_: a clipsteer PNG, run.json or run folder (or an AUTOMATIC1111 PNG): generate that image or run
            again (:mod:`generators.runs.replay`); keyword options override its own.
        seeds: the seed of each image (``[3, 7]`` or ``"0-3"``): one run of ``len(seeds)`` images. Without it,
            image *i* of ``num_images`` uses ``seed + i``; ``seed=-1`` draws a random seed (recorded).
        keep_inputs: copy the input files (init image, image prompts) into the run folder's ``inputs/`` and
            record them there (:mod:`generators.runs.inputs`).
        **options: any option of :class:`RunSettings` or of the backend's ``Settings``
            (``iterations=``, ``seed=``, ``size=(W, H)``, ``clip=[...]``...), or diffusers' name of one
            (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``num_images_per_prompt``,
            ``generator``: see :data:`generators.runs.options.DIFFUSERS_NAMES`); ``output_type="pil"`` makes
            ``run.images`` a list of PIL images (default ``"pt"``: a tensor).
    """
    t_start = time.perf_counter()
    output_type = options.pop("output_type", "pt")
    if output_type not in ("pt", "pil"):
        raise ValueError(f"output_type {output_type!r}: use 'pt' (run.images a [B,3,H,W] tensor, the default) "
                         "or 'pil' (a list of PIL images)")
    if stop is not None:
        callback = _stop_when_set(stop, callback)
    replayed = None
    if from_ is not None:
        from .replay import replay_config

        if config is not None or resume is not None:
            raise ValueError("--from replays a PNG or run.json as the options' base; give --from or "
                             "--config/--resume, not both")
        config = replay_config(from_)
        replayed, own_seeds = str(Path(from_).expanduser().absolute()), config.pop("seeds", None)
        if seeds is None and all(options.get(k) is None for k in ("seed", "num_images", "num_images_per_prompt",
                                                                  "generator")):
            seeds = own_seeds
    if resume is not None:
        from .checkpoint import resume_options

        if prompt is not None or backend is not None or preset is not None or config is not None:
            raise ValueError("--resume continues a run with its own prompt, backend and options; give no prompt, "
                             "--backend, --preset or --config with it")
        backend, opts, provenance = resume_options(resume, options)
    else:
        backend, opts, provenance = resolve_options(prompt, backend=backend, preset=preset, config=config, **options)
    if replayed is not None:
        provenance["replayed_from"] = replayed
    if seeds is not None:
        use_seeds(seeds, opts, provenance)
    threads = opts.get("threads")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with quiet_libraries(bars=not opts.get("progress", True)):   # progress=False hides theirs too
            run = _generate(backend, opts, provenance, save=save, callback=callback, t_start=t_start,
                            keep_inputs=keep_inputs)
        if output_type == "pil":
            run.images = run.pil_images
        return run
    finally:
        torch.set_num_threads(before)


def _stop_when_set(stop, callback: Callable | None) -> Callable:
    """The step callback, then ``KeyboardInterrupt`` once *stop* is set: every backend handles it as Ctrl-C."""
    def step(info: StepInfo):
        keep_going = callback(info) if callback is not None else None
        if stop.is_set():
            raise KeyboardInterrupt
        return keep_going
    return step


@dataclass
class _Prepared:
    """Everything a run needs, built before the first step."""

    backend: str
    opts: dict[str, Any]
    provenance: dict
    seed: int
    device: torch.device
    schedule: Any
    label: str
    eval_model: str | None
    formats: list[str]
    save_every: int
    settings: Any
    objective: Any
    generator: Any
    t_start: float
    t_loaded: float = 0.0
    recorded: dict | None = None        # the options as run.json records them (generators.runs.record)
    precision: Any = None      # guidance.runtime.PrecisionChoice
    seeds: list[int] = field(default_factory=list)   # each image's seed: seed + i, or --seeds


def prepare(backend: str, opts: dict[str, Any], provenance: dict, *, t_start: float | None = None) -> _Prepared:
    """Check every option, then load the models: objective, backend. Nothing is written yet."""
    from guidance import resolve_device
    from guidance.runtime import choose_precision

    t_start = time.perf_counter() if t_start is None else t_start
    seed = opts.get("seed")
    # no seed, or A1111's -1: a fresh one, recorded
    opts["seed"] = seed = secrets.randbelow(2**31 - 1) if seed is None or seed == -1 else check_seed(seed)
    device = resolve_device(opts.get("device"))
    choice = choose_precision(opts.get("precision") or "auto", device)     # one choice for every model of the run
    precision = choice.precision
    cls = get_generator_class(backend)
    settings = backend_settings(backend, opts)
    seeds = list(provenance.get("seeds") or [seed + i for i in range(int(getattr(settings, "num_images", 1) or 1))])
    check_seed(seeds[-1], f"seed {seed} + {len(seeds) - 1} (the last image's)")
    schedule = build_schedule(opts)
    own = getattr(settings, "prompt", None)
    if schedule is None and isinstance(own, str) and own.strip():
        # the backend's own conditioning text (sd: --sd-prompt) is what the run is of: it is scored against it
        schedule = build_schedule({**opts, "prompt": own})
    if schedule is None:
        raise ValueError("nothing to steer towards: give a text prompt, --story, --image-prompt or --noise-prompt")
    formats = _animation_formats(opts)
    save_every = int(opts.get("save_every") or 0)
    cls.check(settings, device)                 # every backend option checked before any model loads
    check_fits(backend, settings, device, precision)   # and the size against the memory free, too
    _warn_about_unused_options(cls, backend, settings, schedule, provenance)
    objective_specs = clip_specs(opts) + [(r["spec"], r["weight"]) for r in reward_specs(opts)]
    if cls.needs_objective and not objective_specs:
        raise ValueError(f"--clip none leaves the {backend} backend nothing to optimise; give a guiding CLIP "
                         "(--clip MODEL) or use a backend that generates without one (e.g. --backend sd)")
    prepared = _Prepared(backend=backend, opts=opts, provenance=provenance, seed=seed, device=device,
                         schedule=schedule, label=_prompt_label(opts, schedule), eval_model=eval_model_for(opts),
                         formats=formats, save_every=save_every, settings=settings, objective=None, generator=None,
                         t_start=t_start, precision=choice, seeds=seeds)
    _announce(choice)
    # Models load here: the objective first (its encoders are cached across runs), then the backend.
    objective = build_objective(opts, schedule, seed=seed, device=device, precision=precision)
    prepared.objective = objective if objective is not None else ConditioningOnly(schedule)
    prepared.generator = cls(settings, device=device, precision=precision)
    set_compiled(compile_targets(prepared.objective, prepared.generator), bool(opts.get("compile")))
    if formats and not save_every:
        total = cls.run_length(settings) or 100
        prepared.save_every = max(1, int(total) // 30)
    prepared.t_loaded = time.perf_counter()
    return prepared


_ANNOUNCED: set[str] = set()


def _announce(choice) -> None:
    """Say once per process what ``--precision auto`` chose on this device and why."""
    if choice.asked == "auto" and str(choice) not in _ANNOUNCED:
        _ANNOUNCED.add(str(choice))
        print(str(choice), file=sys.stderr)


def compile_targets(objective, generator) -> list[torch.nn.Module]:
    """What ``--compile`` compiles: the image tower of every CLIP encoder in the objective, and the
    backend's decoder. (Text towers run once per prompt, so compiling them would cost more than it saves.)"""
    from guidance import Encoder

    modules = getattr(objective, "modules", None)
    encoders = [m for m in modules() if isinstance(m, Encoder)] if modules is not None else []
    return [enc.image_tower for enc in encoders] + list(generator.compile_targets())


def _warn_about_unused_options(cls, backend: str, settings, schedule, provenance: dict) -> None:
    """One-line warnings for options that would do nothing; an error when no prompt can steer."""
    from dataclasses import fields

    if all(p.weight == 0 for prompts in schedule.entries.values() for p in prompts):
        raise ValueError("every prompt has weight 0, so nothing steers the image; give a prompt a non-zero weight "
                         "(e.g. 'a red fox:1')")
    sources = provenance.get("sources", {})
    for f in fields(settings) if is_dataclass(settings) else ():
        needed = f.metadata.get("requires")
        needed = (needed,) if isinstance(needed, str) else tuple(needed or ())
        if needed and sources.get(f.name, "default") not in ("default",) and not any(getattr(settings, n, None)
                                                                                     for n in needed):
            flags = " or ".join("--" + n.replace("_", "-") for n in needed)
            warnings.warn(f"--{f.name.replace('_', '-')} does nothing without {flags} "
                          f"({backend} backend); it is ignored", stacklevel=3)
    length = cls.run_length(settings)
    late = [step for step in schedule.entries if length is not None and step >= length > 0]
    if late:
        warnings.warn(f"story step(s) {', '.join(map(str, late))} start at or after the run's last step "
                      f"({length} steps); they never apply", stacklevel=3)


def execute(prep: _Prepared, *, folder: Path | None, callback: Callable | None) -> tuple[GenerationResult, "Progress"]:
    """Run the backend with the progress bar, frames and the user's callback."""
    progress = Progress(enabled=bool(prep.opts.get("progress", True)), save_every=prep.save_every,
                         frames_dir=(folder / "frames") if folder is not None else None, user=callback)
    resumed = prep.provenance.get("resumed_from")
    if len(prep.seeds) > 1:                    # one image per seed, one after another (no checkpoint)
        try:
            return each_seed(prep, progress), progress
        finally:
            progress.close()
    if prep.generator.resumable and (folder is not None or resumed):
        from .checkpoint import Checkpointer, load_state

        from .record import run_identity

        prep.generator.checkpoint = Checkpointer(folder, every=getattr(prep.settings, "checkpoint_every", 0),
                                                 resume=load_state(resumed["folder"]) if resumed else None,
                                                 identity=run_identity(prep.backend, _recorded(prep, folder)))
    try:
        try:
            result = prep.generator.generate(prep.objective, seed=prep.seed, callback=progress)
        except KeyboardInterrupt:
            # A backend that does not catch Ctrl-C itself: keep the last state it reported.
            if progress.last is None:
                raise
            done = progress.last.step + 1
            result = GenerationResult(images=progress.last.decode().float().cpu(), interrupted=True, steps_done=done)
    finally:
        progress.close()
    return result, progress


def _recorded(prep: _Prepared, folder: Path | None) -> dict[str, Any]:
    """The run's options as run.json records them (computed once: the checkpoint's digest is of these)."""
    if prep.recorded is None:
        from .record import recorded_options

        prep.recorded = recorded_options(prep.opts, prep.provenance["sources"], folder,
                                         str(prep.opts.get("record_paths") or "relative"))
    return prep.recorded


def record(prep: _Prepared, result: GenerationResult, progress: "Progress", folder: Path | None) -> Run:
    """Score the images, write the PNG(s), animation and run.json (last)."""
    t_generated = time.perf_counter()
    images = result.images.detach().float().cpu().clamp(0, 1)
    steps_done = int(result.steps_done or result.info.get("steps_done", len(result.losses)) or 0)
    score: dict[str, Any] = {"clip_score": None}
    if prep.eval_model is not None:
        try:
            score = score_images(images, prep.schedule, model=prep.eval_model, step=max(steps_done - 1, 0),
                                 device=prep.device)
        except Exception as err:  # the image is kept whatever happens to its score
            warnings.warn(f"CLIP score with {prep.eval_model!r} failed ({err.__class__.__name__}: "
                          f"{first_line(err, 200)}); the image is saved without it", stacklevel=2)
            score = {"clip_score": None, "error": f"{err.__class__.__name__}: {err}"}
    t_scored = time.perf_counter()

    from .infotext import model_record
    from .outputs import image_name
    from .record import recorded_options, recorded_value

    seeds = [prep.seeds[i] if i < len(prep.seeds) else prep.seed + i for i in range(images.shape[0])]
    names = [image_name(i, seed) for i, seed in enumerate(seeds)]
    settings = prep.settings
    mode, sources = str(prep.opts.get("record_paths") or "relative"), prep.provenance["sources"]
    record = RunRecord(
        prompt=prep.label, seed=prep.seed, seeds=seeds, backend=prep.backend, clip_score=score.get("clip_score"),
        image=names[0], images=names, interrupted=bool(result.interrupted), stopped_at=result.stopped_at,
        eval_model=recorded_options({"eval_model": prep.eval_model}, sources, folder, mode)["eval_model"],
        clip_scores=score, prompts={str(k): v for k, v in prep.schedule.as_dict().items()},
        settings=_recorded(prep, folder),
        backend_settings=recorded_options(asdict(settings) if is_dataclass(settings) else dict(vars(settings)),
                                          sources, folder, mode),
        option_sources={k: v for k, v in sorted(prep.provenance["sources"].items()) if v != "default"},
        preset=prep.provenance["preset"], config=prep.provenance["config"],
        model=model_record(prep.backend, prep.opts), device=str(prep.device),
        precision=str(prep.generator.dtype).replace("torch.", ""),
        precision_choice=prep.precision.as_dict() if prep.precision is not None else None,
        steps_done=steps_done, info=result.info, versions=_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        losses=[float(x) if math.isfinite(float(x)) else None for x in result.losses],
        **{key: prep.provenance[key] for key in ("resumed_from", "replayed_from", "inputs") if prep.provenance.get(key)})
    if getattr(prep.generator.checkpoint, "saved", None) is not None:
        record.checkpoint = prep.generator.checkpoint.saved.name
    rewards = reward_specs(prep.opts)
    if rewards:   # which rewards steered (for evaluate.py --held-out) and their score at every step
        record.rewards = [{k: r[k] for k in ("label", "name", "model", "weight", "spec")} for r in rewards]
        from guidance.rewards import CLIPReward

        record.steered_by = [(f"clip:{r['model'] or CLIPReward.default_model}" if r["name"] == "clip" else r["name"])
                             for r in rewards if r["weight"] != 0]
        record.reward_scores = progress.reward_log()
    # the config file, resumed_from, models in info...; the settings as the checkpoint's digest has them
    record = RunRecord.from_dict(recorded_value(record.to_dict(), folder, mode, keep=("settings",)))
    run = Run(images=images, record=record, path=folder, clip_score=score.get("clip_score"),
              interrupted=bool(result.interrupted), frames=progress.frames)
    if folder is not None:
        _save(run, folder, names, prep.formats, float(prep.opts.get("fps") or 10.0), images)
    t_saved = time.perf_counter()
    record.timings = {
        "load_s": round(prep.t_loaded - prep.t_start, 3), "generate_s": round(t_generated - prep.t_loaded, 3),
        "score_s": round(t_scored - t_generated, 3), "save_s": round(t_saved - t_scored, 3),
        "total_s": round(t_saved - prep.t_start, 3),
        "seconds_per_step": round((t_generated - prep.t_loaded) / steps_done, 4) if steps_done else None,
    }
    if folder is not None:
        record.write(folder)
    return run


def _generate(backend: str, opts: dict[str, Any], provenance: dict, *, save: bool, callback, t_start: float,
              keep_inputs: bool = False) -> Run:
    prep = prepare(backend, opts, provenance, t_start=t_start)
    folder = None
    with CtrlC() as ctrl_c:
        if save:
            from .outputs import new_run_dir

            folder = new_run_dir(opts.get("out") or "outputs", prep.label)
        try:
            if folder is not None and keep_inputs:
                from .inputs import keep_inputs as copy_inputs

                prep.provenance["inputs"] = copy_inputs(prep.opts, prep.settings, folder, prep.backend)
            result, progress = execute(prep, folder=folder, callback=callback)
        except BaseException:
            if folder is not None:
                _remove_if_empty(folder, inputs=prep.provenance.get("inputs") or ())
            raise
        ctrl_c.pressed = True        # from here on Ctrl-C is only remembered: the run is written whole
        return record(prep, result, progress, folder)


def _animation_formats(opts: Mapping[str, Any]) -> list[str]:
    from .outputs import animation_formats

    formats = animation_formats(opts.get("animation"))
    if "mp4" in formats:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError("--animation mp4 needs the imageio-ffmpeg package (it bundles ffmpeg): "
                             "pip install imageio-ffmpeg, or use --animation gif") from None
    return formats


def _save(run: Run, folder: Path, names: list[str], formats: list[str], fps: float, images: torch.Tensor) -> None:
    """Final PNG(s) with metadata and the animation(s); the sidecar is written by the caller, last."""
    import json

    from .infotext import PARAMETERS_KEY, format_parameters
    from .outputs import PNG_KEY, save_animation, save_png, to_jsonable, to_pil

    pils = to_pil(images)
    meta = run.metadata
    for i, (name, im) in enumerate(zip(names, pils)):
        seed = meta["seeds"][i]
        # no "prompt" chunk: ComfyUI reads one as its own JSON workflow; A1111's "parameters" instead
        text = {PARAMETERS_KEY: format_parameters(meta, seed=seed, size=im.size), "seed": str(seed),
                "backend": meta["backend"], "Software": "clipsteer",
                PNG_KEY: json.dumps(to_jsonable({**meta, "image": name, "index": i, "seed": seed}))}
        per_image = (meta.get("clip_scores") or {}).get("per_image") or []
        if i < len(per_image) and per_image[i] is not None:     # each PNG carries its own score
            text["clip_score"] = f"{per_image[i]:.4f}"
        run.image_paths.append(save_png(im, folder / name, text=text))
    if formats:
        frames = list(run.frames) + [pils[0]]
        run.record.animations = [save_animation(frames, folder / f"animation.{fmt}", fps=fps).name for fmt in formats]


def _remove_if_empty(folder: Path, inputs=()) -> None:
    """Remove a failed run's folder when nothing but the copies of its inputs (and no frame) was written."""
    try:
        for name in inputs:
            (folder / name).unlink(missing_ok=True)
        if inputs and not any((folder / "inputs").iterdir()):
            (folder / "inputs").rmdir()
        frames = folder / "frames"
        if frames.is_dir() and not any(frames.iterdir()):
            frames.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


__all__ = ["generate", "Run", "prepare", "execute", "record"]
