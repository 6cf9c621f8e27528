"""Where the toy models' weights live: ``toyworld/weights/<name>``, next to this file."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> files that must exist in the folder for it to be usable
CLIPS = ("clip_a", "clip_b", "clip_c", "clip_d")
_CLIP_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json")
MODELS: dict[str, tuple[str, ...]] = {
    **{name: _CLIP_FILES for name in CLIPS},
    "vqgan": ("config.yaml", "model.safetensors"),
    "sd": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
           "tokenizer/vocab.json", "scheduler/scheduler_config.json"),
    "sd_turbo": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"),
    "itm": ("config.json", "model.safetensors", "vocab.txt", "processor_config.json"),
}
RETRAIN = {**{name: "clip" for name in CLIPS}, "vqgan": "vqgan", "sd": "sd", "sd_turbo": "sd_turbo", "itm": "itm"}


class ToyWeightsMissing(FileNotFoundError):
    """The committed toy weights are not where they should be."""


def weights_dir(name: str, check: bool = True) -> Path:
    """The folder of toy model ``name`` (one of ``clip_a``, ``clip_b``, ``clip_c``, ``clip_d``, ``vqgan``, ``sd``,
    ``sd_turbo``).

    Raises ``ToyWeightsMissing`` (a ``FileNotFoundError``) naming the missing files and the
    command that recreates them, unless ``check`` is false.
    """
    if name not in MODELS:
        raise KeyError(f"unknown toy model {name!r}; choose from {sorted(MODELS)}")
    folder = WEIGHTS_DIR / name
    if check:
        missing = [f for f in MODELS[name] if not (folder / f).is_file()]
        if missing:
            raise ToyWeightsMissing(
                f"toy model {name!r} is incomplete at {folder} (missing: {', '.join(missing)}); "
                f"recreate it with `python scripts/train_toy.py --only {RETRAIN[name]}`"
            )
    return folder
