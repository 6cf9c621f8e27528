"""The options every run has, whatever the backend: prompts, guidance, output, runtime.

Each field becomes a ``--flag`` of ``scripts/generate.py``, a config-file key and a web-UI field
(see :mod:`generators.runs.options`); backends add their own ``Settings`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from guidance.build import DEFAULT_CLIP

from ..base import option

# Option groups, in --help order.
GROUPS = {
    "prompts": "what to draw: text, image and noise prompts, schedules",
    "guidance": "how CLIP and reward models steer: models, rewards, cutouts, augmentations, extra image losses",
    "output": "seed, run folder, frames, animation, evaluation",
    "runtime": "device and precision",
}


@dataclass
class RunSettings:
    """Options shared by every backend (each becomes a CLI option and a config-file key)."""

    # prompts
    prompt: str | None = option(
        None, "text prompt(s): 'a lighthouse at dusk:1|fog:0.5|blurry:-1' (TEXT[:WEIGHT[:STOP]], "
        "'|'-separated; negative weights push away)", group="prompts", positional=True, text_only=True)
    story: str | None = option(
        None, "prompt schedule ('story mode'): '0=a forest; 100=a city|night:0.5' switches prompts at those steps",
        group="prompts", metavar="SCHEDULE", text_only=True, mapping_ok=True)
    change_prompt_every: int = option(
        0, "VQGAN-CLIP's story syntax: with '^' in the prompt ('a sunflower|photo:-1 ^ a rose'), move to the next "
        "'^'-separated phrase every N steps, back to the first after the last", group="prompts", metavar="N",
        minimum=0)
    image_prompts: list[str] = option(list, "image prompt PATH[:WEIGHT] (repeatable)", group="prompts",
                                      flag="--image-prompt", metavar="PATH[:W]", path="file")
    noise_prompts: list[str] = option(list, "noise prompt SEED[:WEIGHT]: a random CLIP target (repeatable)",
                                      group="prompts", flag="--noise-prompt", metavar="SEED[:W]")
    # guidance
    clip: list[str] = option(
        lambda: [DEFAULT_CLIP], "guiding CLIP: Hub id, local folder, open_clip:ARCH/TAG, open_clip:ARCH/CHECKPOINT_FILE, "
        "open_clip:hf-hub:ORG/REPO or open_clip:local-dir:FOLDER; MODEL=WEIGHT to weight it; one per flag, repeat "
        "for an ensemble; 'none' for no CLIP guidance", group="guidance", metavar="MODEL[=W]", path="model")
    rewards: list[str] = option(
        list, "reward model to steer by as well, NAME[:MODEL][=WEIGHT]: clip, pickscore, hps (HPSv2.1; hps:v2), "
        "imagereward, aesthetic; MODEL a Hub id, local folder or file; WEIGHT multiplies -score (default: ReNO's "
        "weights, see README); one per flag, repeatable", group="guidance", flag="--reward",
        metavar="NAME[:MODEL][=W]", path="model")
    reward_checkpointing: bool = option(False, "recompute the reward models' image towers in the backward pass "
                                               "(gradient checkpointing: less memory, slower)", group="guidance")
    cutouts: int = option(32, "cutouts per image per step", group="guidance", metavar="N", minimum=1)
    cut_pow: float = option(1.0, "cutout size exponent (>1 favours small cutouts)", group="guidance", above=0)
    overview: int = option(0, "how many of the cutouts show the whole image", group="guidance", metavar="N",
                           minimum=0)
    min_fraction: float | None = option(None, "smallest cutout side as a fraction of the image (default: CLIP's "
                                              "input size)", group="guidance", above=0, maximum=1)
    augmentations: list[str] = option(
        lambda: ["Af", "Pe", "Ji", "Er"], "cutout augmentations, names or short names with optional probability "
        "('Af Pe Ji Er', 'jitter:0.3'); 'none' for none", group="guidance", flag="--augment", metavar="AUG")
    distance: str = option("spherical", "embedding distance", group="guidance", choices=["spherical", "cosine"])
    tv_weight: float = option(0.0, "total-variation loss weight (smoother images)", group="guidance")
    range_weight: float = option(0.0, "weight of a penalty on pixels outside [0, 1]", group="guidance")
    saturation_weight: float = option(0.0, "saturation loss weight (positive desaturates, negative saturates)",
                                      group="guidance")
    symmetry_weight: float = option(0.0, "left-right symmetry loss weight", group="guidance")
    # output
    seed: int | None = option(None, "random seed, 0 to 2**64-1 (default: a fresh one, recorded in the metadata)",
                              group="output", metavar="N")
    out: str = option("outputs", "folder in which each run gets a new sub-folder", group="output", metavar="DIR")
    save_every: int = option(0, "keep a frame every N steps (frames/ in the run folder); 0: none", group="output",
                             metavar="N", minimum=0)
    animation: str = option("none", "animation of the frames: none, gif, mp4 or both", group="output",
                            choices=["none", "gif", "mp4", "both"])
    fps: float = option(10.0, "animation frames per second", group="output", above=0)
    eval_model: str = option("auto", "CLIP that scores the final image: a model name or folder, 'auto' (a "
                                     "different CLIP from the guiding one) or 'none'", group="output", metavar="MODEL",
                           path="model")
    progress: bool = option(True, "show a progress bar", group="output")
    record_paths: str = option("relative", "how run.json and the PNGs record local paths: relative (to the run "
                                           "folder; a preset's models by the preset's name) or absolute",
                               group="output", choices=["relative", "absolute"])
    # runtime
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", group="runtime")
    precision: str = option("auto", "auto, fp32, bf16 or fp16 (fp16 on GPUs only). auto: bf16 on GPUs and CPUs that "
                                    "run it natively (CPU: AMX or AVX-512 BF16), fp16 on older GPUs and Apple MPS, "
                                    "else fp32; printed once and recorded in run.json. bf16/fp16: models hold half "
                                    "weights and the hot loop runs in half precision; latents, optimiser and "
                                    "losses stay fp32", group="runtime")
    compile: bool = option(False, "torch.compile the CLIP image towers and the decoder of the hot loop (the first "
                                  "steps compile; pays on long runs, mostly on GPUs)", group="runtime")
    threads: int | None = option(None, "CPU threads torch may use (default: torch's own choice); 1 is fastest for "
                                       "tiny models on a busy machine", group="runtime", metavar="N", minimum=1)


RUN_NAMES: set[str] = {f.name for f in fields(RunSettings)}

__all__ = ["RunSettings", "GROUPS", "RUN_NAMES"]
