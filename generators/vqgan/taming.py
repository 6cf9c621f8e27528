"""taming-transformers first-stage (VQGAN) checkpoints: read the config, load the weights
safely, build the model, convert to safetensors.

A taming ``.ckpt`` is a PyTorch Lightning pickle: besides ``state_dict`` it holds OmegaConf
hyper-parameters, callback and optimiser state. :func:`load_state_dict` reads it with an
unpickler that imports nothing: tensors and plain containers are rebuilt, every other global
(OmegaConf, Lightning, ``os.system``...) becomes an inert stand-in object that is never
called, so no code from the file runs. Only first-stage tensors are kept (``loss.*``, the
discriminator and LPIPS weights are dropped). :func:`convert_to_safetensors` writes them once
as ``model.safetensors`` so later loads need no pickle at all.

The model is assembled from taming's building blocks (``Encoder``/``Decoder`` and
``VectorQuantizer2``/``GumbelQuantize``) from the YAML's ``ddconfig``/``n_embed``/``embed_dim``
only; ``target:`` class paths are never imported, and plain-VQ vs Gumbel is decided by the
weights' key names (``quantize.embedding.weight`` vs ``quantize.embed.weight``).

``python -m generators.vqgan.taming convert last.ckpt out_folder`` converts from the shell.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import io
import os
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from guidance.errors import USER_ERRORS, first_line

FIRST_STAGE_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
_DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels",
                  "resolution", "z_channels")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass
class TamingConfig:
    """The few numbers of a taming VQGAN config that define the first-stage model."""

    embed_dim: int
    n_embed: int
    ddconfig: dict[str, Any]
    gumbel_hint: bool = False
    kl_weight: float = 1e-8
    source: str = ""

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TamingConfig":
        """Read ``model.params`` from a taming YAML (``yaml.safe_load``: no tags, no imports)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VQGAN config {str(path)!r} does not exist; give the taming config.yaml "
                                    "that came with the checkpoint")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"VQGAN config {str(path)!r} is not valid YAML ({err.__class__.__name__}); "
                             "give the taming config.yaml that came with the checkpoint") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> "TamingConfig":
        """From the parsed YAML (``{"model": {"params": ...}}``, or just the params)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source} does not look like a taming VQGAN config (expected a mapping with "
                             "model.params.ddconfig)")
        model = data.get("model", data)
        params = model.get("params", model) if isinstance(model, Mapping) else None
        if not isinstance(params, Mapping) or not isinstance(params.get("ddconfig"), Mapping):
            raise ValueError(f"{source} does not look like a taming VQGAN config: model.params.ddconfig is "
                             "missing; give the first-stage config.yaml that came with the checkpoint")
        dd = dict(params["ddconfig"])
        missing = [k for k in _DDCONFIG_KEYS if k not in dd]
        missing += [k for k in ("n_embed", "embed_dim") if k not in params]
        if missing:
            raise ValueError(f"{source}: model.params is missing {', '.join(missing)}; this is not a complete "
                             "taming VQGAN config")
        if params.get("remap"):
            raise ValueError(f"{source}: codebook remapping (remap: {params['remap']}) is not supported; "
                             "use a VQGAN without remap")
        if dd.get("double_z", False):
            raise ValueError(f"{source}: ddconfig.double_z is true, which is a KL autoencoder, not a VQGAN")
        dd["ch_mult"] = [int(m) for m in dd["ch_mult"]]
        dd["attn_resolutions"] = [int(r) for r in dd["attn_resolutions"]]
        for key in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
            dd[key] = int(dd[key])
        dd["double_z"] = False
        dd["dropout"] = float(dd.get("dropout", 0.0))
        # ``target`` is read as text only, as a hint; it is never imported.
        target = str(model.get("target", "")) if isinstance(model, Mapping) else ""
        gumbel_hint = target.endswith("GumbelVQ") or "temperature_scheduler_config" in params
        return cls(embed_dim=int(params["embed_dim"]), n_embed=int(params["n_embed"]), ddconfig=dd,
                   gumbel_hint=gumbel_hint, kl_weight=float(params.get("kl_weight", 1e-8)), source=source)

    def to_yaml(self, gumbel: bool | None = None) -> str:
        """A minimal taming-layout YAML for this config (written next to converted weights)."""
        import yaml

        gumbel = self.gumbel_hint if gumbel is None else gumbel
        params: dict[str, Any] = {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": self.ddconfig}
        if gumbel:
            params["kl_weight"] = self.kl_weight
        target = "taming.models.vqgan.GumbelVQ" if gumbel else "taming.models.vqgan.VQModel"
        return yaml.safe_dump({"model": {"target": target, "params": params}}, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Safe unpickling
# ---------------------------------------------------------------------------------------------

class _StandIn:
    """An inert object standing in for any global the unpickler refuses to import.

    It accepts whatever pickle hands it (constructor arguments, state, dict or list items)
    and does nothing with it.
    """

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self._global_name}>"


def _rebuild_from_type(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2`` restricted to plain tensors and parameters."""
    tensor = func(*args)
    if new_type is nn.Parameter and isinstance(tensor, torch.Tensor):
        return nn.Parameter(tensor, requires_grad=False)
    return tensor


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch._utils as tu

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): tu._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): tu._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): tu._rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
    }
    if hasattr(tu, "_rebuild_parameter_with_state"):
        allowed[("torch._utils", "_rebuild_parameter_with_state")] = tu._rebuild_parameter_with_state
    for name, value in _BUILTINS.items():
        allowed[("builtins", name)] = value
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


# Constructors of plain values: calling them has no effect outside the object they build.
_BUILTINS = {t.__name__: t for t in (set, frozenset, slice, complex, range, dict, list, tuple, int, float, str,
                                      bool, bytes, bytearray)}


def _safe_pickle_module(skipped: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose unpickler imports no global outside an allow-list."""
    allowed = _allowed_globals()
    standins: dict[tuple[str, str], type] = {}

    class SafeUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # Python 2 names (protocol 2 pickles write ``__builtin__``), mapped as pickle itself does.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            key = (module, name)
            if key in allowed:
                return allowed[key]
            skipped.add(f"{module}.{name}")
            if key not in standins:
                standins[key] = type(name if name.isidentifier() else "StandIn", (_StandIn,),
                                     {"_global_name": f"{module}.{name}", "__module__": __name__})
            return standins[key]

    def load(file, **kwargs):
        return SafeUnpickler(file, **kwargs).load()

    def loads(data, **kwargs):
        return SafeUnpickler(io.BytesIO(data), **kwargs).load()

    module = types.ModuleType("clipsteer_safe_pickle")
    module.Unpickler = SafeUnpickler
    module.load = load
    module.loads = loads
    module.UnpicklingError = pickle.UnpicklingError
    return module


def _read_checkpoint(path: Path) -> tuple[Any, set[str]]:
    skipped: set[str] = set()
    try:
        # weights_only=False only because torch refuses a custom pickle_module otherwise: the
        # module passed here is the restricted one above, which imports nothing outside its list.
        obj = torch.load(path, map_location="cpu", pickle_module=_safe_pickle_module(skipped), weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # corrupt zip, truncated pickle, not a torch file...
        msg = first_line(err)
        raise ValueError(f"could not read VQGAN checkpoint {str(path)!r} ({err.__class__.__name__}: {msg}); "
                         "is it a complete taming .ckpt file?") from None
    return obj, skipped


def _first_stage_tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"VQGAN checkpoint {str(path)!r} holds no state_dict (found {type(obj).__name__}); "
                         "is it a taming first-stage checkpoint?")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # Checkpoints of full taming/LDM models keep the VQGAN under a prefix.
    prefix = next((p for p in ("", "first_stage_model.", "model.", "vqgan.", "module.")
                   if f"{p}decoder.conv_in.weight" in tensors), None)
    if prefix is None:
        raise ValueError(f"VQGAN checkpoint {str(path)!r} has no decoder weights (decoder.conv_in.weight); "
                         "is it a taming first-stage (VQGAN) checkpoint?")
    out = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name.startswith(FIRST_STAGE_PREFIXES):  # drops loss.* (discriminator, LPIPS) and the rest
                out[name] = value.detach()
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """First-stage weights from a ``.safetensors`` file or a taming/Lightning ``.ckpt`` (read safely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"could not read {str(path)!r} as safetensors ({err.__class__.__name__}); "
                             "is the file complete?") from None
    else:
        obj, _ = _read_checkpoint(path)
    return _first_stage_tensors(obj, path)


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a ``.ckpt`` holds besides tensors: its top-level keys and the globals that were not imported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint {str(path)!r} does not exist; check the path")
    obj, skipped = _read_checkpoint(path)
    keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
    return {"keys": keys, "skipped_globals": sorted(skipped)}


def is_gumbel(state: Mapping[str, torch.Tensor]) -> bool:
    """Gumbel VQ (``quantize.embed.weight``, ``quantize.proj``) or plain VQ (``quantize.embedding.weight``)."""
    if "quantize.embed.weight" in state:
        return True
    if "quantize.embedding.weight" in state:
        return False
    raise ValueError("VQGAN weights have no codebook (quantize.embedding.weight or quantize.embed.weight); "
                     "is this a VQGAN checkpoint?")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class FirstStage(nn.Module):
    """A taming VQGAN's encoder, quantiser and decoder (Esser et al. 2021, "Taming Transformers").

    ``encode`` maps images in ``[-1,1]`` to quantised latents in codebook space; ``decode`` maps
    such latents back to images in (roughly) ``[-1,1]``.
    """

    def __init__(self, config: TamingConfig, *, gumbel: bool | None = None):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        self.config = config
        self.gumbel = config.gumbel_hint if gumbel is None else bool(gumbel)
        dd = config.ddconfig
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.encoder = Encoder(**dd)
            self.decoder = Decoder(**dd)
        if self.gumbel:
            if dd["z_channels"] != config.embed_dim:
                raise ValueError(f"{config.source}: a Gumbel VQGAN needs z_channels == embed_dim; got "
                                 f"{dd['z_channels']} and {config.embed_dim}")
            self.quantize = GumbelQuantize(dd["z_channels"], config.embed_dim, n_embed=config.n_embed,
                                           kl_weight=config.kl_weight, temp_init=1.0)
        else:
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(dd["z_channels"], config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, dd["z_channels"], 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors ``[n_embed, embed_dim]``."""
        return self.quantize.embed.weight if self.gumbel else self.quantize.embedding.weight

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1,1]`` -> quantised latents ``[B, embed_dim, H/f, W/f]`` (deterministic)."""
        h = self.quant_conv(self.encoder(images))
        codebook = self.codebook
        if self.gumbel:
            # The most likely code (no Gumbel noise, so encoding is deterministic).
            index = self.quantize.proj(h).argmax(1)
        else:
            index = nearest_code(h, codebook)
        return codebook[index].permute(0, 3, 1, 2).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``[B,H,W]`` of the nearest code vector (squared L2) for each cell of ``z [B,D,H,W]``."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
    return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


def build_first_stage(config: TamingConfig, state: Mapping[str, torch.Tensor] | None = None) -> FirstStage:
    """The model for *config*, with *state*'s weights (random weights when ``state`` is None).

    With weights, the modules are made on the meta device and the tensors assigned, so no
    time goes into random initialisation.
    """
    if state is None:
        return FirstStage(config).eval().requires_grad_(False)
    gumbel = is_gumbel(state)
    with torch.device("meta"):
        model = FirstStage(config, gumbel=gumbel)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "") if part)
        raise ValueError(f"VQGAN weights do not match the config {config.source}: {detail}; check that the "
                         "config and the checkpoint belong together")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), first_line(err, 200))
        raise ValueError(f"VQGAN weights do not match the config {config.source}: {first[:200]}; check that the "
                         "config and the checkpoint belong together") from None
    return model.eval().requires_grad_(False)


def load_first_stage(config_path: str | Path, weights_path: str | Path) -> FirstStage:
    """Build a VQGAN from a taming YAML and a ``.ckpt``/``.safetensors`` file (loaded safely)."""
    config = TamingConfig.from_yaml(config_path)
    return build_first_stage(config, load_state_dict(weights_path))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def convert_to_safetensors(checkpoint: str | Path, out: str | Path, *, config: str | Path | None = None,
                           overwrite: bool = False) -> Path:
    """Write a ``.ckpt``'s first-stage weights as safetensors (read without running its pickle).

    *out* ending in ``.safetensors`` is the file to write; otherwise it is a folder that gets
    ``model.safetensors`` plus ``config.yaml`` (from *config*, or the YAML found beside the
    checkpoint), i.e. a folder ``--vqgan`` loads directly. Existing files are never replaced
    unless ``overwrite=True``. Returns the path of the weights file.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_state_dict(checkpoint)
    gumbel = is_gumbel(state)
    if out.suffix == ".safetensors":
        weights, config_out = out, None
    else:
        weights, config_out = out / "model.safetensors", out / "config.yaml"
    if config is None and config_out is not None:
        config = _config_beside(checkpoint)
        if config is None:
            raise FileNotFoundError(f"no taming config YAML found beside {str(checkpoint)!r}; pass config= "
                                    "(--config FILE) so the folder can be loaded later")
    for target in (weights, config_out):
        if target is not None and target.exists() and not overwrite:
            raise FileExistsError(f"{str(target)!r} already exists; choose another output or pass overwrite=True "
                                  "(--overwrite) to replace it")
    cfg_text = None
    if config is not None:
        cfg = TamingConfig.from_yaml(config)
        build_first_stage(cfg, state)  # refuse to write weights that do not fit their config
        cfg_text = Path(config).read_text() if config_out is not None else None
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage: give each its own contiguous copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(state.items())}
    tmp = weights.with_name(weights.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": "taming-transformers first stage",
                                           "quantizer": "gumbel" if gumbel else "vq"})
    os.replace(tmp, weights)
    if config_out is not None and cfg_text is not None:
        config_out.write_text(cfg_text)
    return weights


def _config_beside(checkpoint: Path) -> Path | None:
    """The taming YAML that usually sits next to a checkpoint (same stem, config.yaml, model.yaml,
    or ``../configs/*.yaml`` in taming's ``logs/NAME/{checkpoints,configs}`` layout)."""
    folder = checkpoint.parent
    for cand in (checkpoint.with_suffix(".yaml"), folder / "config.yaml", folder / "model.yaml",
                 folder.parent / "configs" / "model.yaml"):
        if cand.is_file():
            return cand
    yamls = sorted(folder.glob("*.yaml")) or sorted((folder.parent / "configs").glob("*project.yaml"))
    return yamls[0] if len(yamls) == 1 else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m generators.vqgan.taming",
        description="Convert a taming-transformers VQGAN .ckpt to safetensors, without running its pickle.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write model.safetensors (+ config.yaml) from a .ckpt")
    conv.add_argument("checkpoint", help="taming .ckpt (e.g. last.ckpt)")
    conv.add_argument("out", help="output folder (gets model.safetensors + config.yaml) or a .safetensors file")
    conv.add_argument("--config", help="taming config YAML (default: the one found beside the checkpoint)")
    conv.add_argument("--overwrite", action="store_true", help="replace existing output files")
    insp = sub.add_parser("inspect", help="list a .ckpt's top-level keys and the globals it would import")
    insp.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            path = convert_to_safetensors(args.checkpoint, args.out, config=args.config, overwrite=args.overwrite)
            print(f"wrote {path}")
        else:
            info = inspect_checkpoint(args.checkpoint)
            print("keys:", ", ".join(info["keys"]) or "(none)")
            print("globals not imported:", ", ".join(info["skipped_globals"]) or "(none)")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
