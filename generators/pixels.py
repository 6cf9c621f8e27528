"""Direct image parameterisations steered by an objective: raw RGB pixels or a Fourier spectrum.

The generator with no learned prior, as in pixray's pixel drawers and the feature-visualisation
literature (Olah et al. 2017, "Feature Visualization", Distill: parameterise the image in a
decorrelated space so that gradient steps favour natural-looking images):

- ``rgb``: the latent is one logit per pixel and channel; the image is ``sigmoid(latent)``.
- ``fft``: the latent is the real 2-D Fourier spectrum of the image (real and imaginary parts),
  scaled by ``1 / frequency ** fft_decay`` before the inverse transform, so one step moves low
  frequencies far more than high ones.
- ``decorrelate``: the three latent channels are luminance and two opponent-colour axes (an
  orthonormal basis, luminance given the largest scale), mapped to RGB before the sigmoid, so
  brightness and colour are optimised separately.

It is the toy world's baseline for what a generator's prior buys: the same objective through a
VQGAN or a diffusion model against through nothing. Runs on the shared loop
(:func:`generators.optimise.optimise`); this file plus one registry line is the whole backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import GenerationResult, Generator, StepCallback, option, seed_generator
from .optimise import OptimiseSettings, check_settings, optimise

PARAMETERISATIONS = ("rgb", "fft")

# Opponent-colour basis (rows: luminance, red-green, blue-yellow), orthonormal, with a scale per
# axis: latent channels are mixed into RGB by ``basis.T @ diag(scales)``.
_BASIS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
_BASIS = _BASIS / _BASIS.norm(dim=1, keepdim=True)
_SCALES = torch.tensor([1.0, 0.5, 0.5])


@dataclass
class PixelsSettings(OptimiseSettings):
    """Options of the ``pixels`` backend (each becomes a CLI option and a config-file key)."""

    iterations: int = option(300, "optimisation steps", metavar="N", minimum=0)
    learning_rate: float = option(0.05, "optimiser learning rate", flag="--lr", above=0)
    parameterisation: str = option("fft", "how the image is parameterised: rgb (one logit per pixel) or fft "
                                          "(a Fourier spectrum scaled towards low frequencies)",
                                   choices=PARAMETERISATIONS, aliases=["--parameterization"])
    decorrelate: bool = option(True, "optimise luminance and two opponent-colour channels instead of R, G, B")
    fft_decay: float = option(1.0, "fft: spectrum scale 1/frequency**decay (0: flat; larger: smoother images)",
                              minimum=0)
    init_scale: float = option(0.01, "standard deviation of the random starting latent (0: a flat grey start)",
                               minimum=0)
    width: int = option(256, "image width in pixels", minimum=8)
    height: int = option(256, "image height in pixels", minimum=8)
    num_images: int = option(1, "images optimised together as one batch, each from its own random start",
                             minimum=1)
    init_image: str | None = option(None, "start from this image instead of a random latent", metavar="PATH",
                                    path="file")


def toy_preset() -> dict:
    """This backend's part of ``--preset toy``, chosen on the toy world's tuning prompts (benchmarks/quality.py
    --prompt-seed 7 --seed-base 10, 12 images each; all three right): rgb lr 0.1 41.7%, rgb 0.2 33.3%,
    rgb 0.05 8.3%, fft 0.1 25.0%, fft 0.05 16.7%."""
    return {"iterations": 100, "learning_rate": 0.1, "parameterisation": "rgb"}


class PixelsGenerator(Generator):
    """Optimise an image directly (``rgb`` or ``fft`` parameterisation) against the objective."""

    name = "pixels"
    Settings = PixelsSettings
    presets = {"toy": toy_preset}
    needs_objective = True
    resumable = True

    @classmethod
    def check(cls, s: PixelsSettings, device=None) -> None:
        check_settings(s)
        if s.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {s.parameterisation!r}; choose rgb or fft")
        for label, value in (("width", s.width), ("height", s.height)):
            if value < 8:
                raise ValueError(f"{label} is {value}; use at least 8 pixels")
        if s.num_images < 1:
            raise ValueError(f"num_images is {s.num_images}; it must be at least 1")
        if s.init_image:
            from guidance.images import check_image_file

            check_image_file(s.init_image, what="init image")

    def __init__(self, settings: PixelsSettings | None = None, *, device=None, precision=None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        self.check(s)
        self._init_pixels = None
        if s.init_image:
            from guidance.images import load_image

            self._init_pixels = load_image(s.init_image, (s.width, s.height), what="init image")
        h, w = s.height, s.width
        fy = torch.fft.fftfreq(h).view(-1, 1)
        fx = torch.fft.rfftfreq(w).view(1, -1)
        freq = (fy ** 2 + fx ** 2).sqrt().clamp_min(1.0 / max(h, w))
        self._spectrum_scale = (freq ** -s.fft_decay).to(self.device)           # [H, W//2+1]
        self._spectrum_scale = self._spectrum_scale / self._spectrum_scale.max()
        mix = _BASIS.t() * _SCALES if s.decorrelate else torch.eye(3)            # latent channel -> RGB
        self._mix = mix.to(self.device)

    # -- the parameterisation ----------------------------------------------------------------
    def _spatial(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent -> pre-sigmoid image ``[B, 3, H, W]`` in the latent colour space."""
        s = self.settings
        if s.parameterisation == "rgb":
            return latent
        spectrum = torch.view_as_complex(latent.contiguous()) * self._spectrum_scale
        return torch.fft.irfft2(spectrum, s=(s.height, s.width), norm="forward")  # DC coefficient = mean logit

    def render(self, latent: torch.Tensor) -> torch.Tensor:
        """Differentiable: latent -> images ``[B, 3, H, W]`` in ``(0, 1)``."""
        x = self._spatial(latent)
        rgb = torch.einsum("bchw,dc->bdhw", x, self._mix)
        return torch.sigmoid(rgb)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.render(latent.detach()).float().cpu()

    def latent_from_images(self, images: torch.Tensor) -> torch.Tensor:
        """The latent whose render is *images* (``[B,3,H,W]`` in ``[0,1]``), inverting each step."""
        s = self.settings
        logits = torch.logit(images.to(self.device, torch.float32).clamp(1e-3, 1 - 1e-3))
        x = torch.einsum("bdhw,dc->bchw", logits, torch.linalg.inv(self._mix).t())
        if s.parameterisation == "rgb":
            return x
        spectrum = torch.fft.rfft2(x, norm="forward") / self._spectrum_scale
        return torch.view_as_real(spectrum).contiguous()

    def initial_latent(self, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        if self._init_pixels is not None:
            return self.latent_from_images(self._init_pixels.expand(s.num_images, -1, -1, -1))
        if s.parameterisation == "rgb":
            shape = (s.num_images, 3, s.height, s.width)
        else:
            shape = (s.num_images, 3, s.height, s.width // 2 + 1, 2)
        return (torch.randn(shape, generator=generator) * s.init_scale).to(self.device)

    # -- the run -------------------------------------------------------------------------------
    def generate(self, objective, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        s = self.settings
        latent = self.initial_latent(seed_generator(seed, "init")).requires_grad_(True)
        out = optimise(latent, self.render, objective, optimizer=s.optimizer, lr=s.learning_rate,
                       schedule=s.lr_schedule, steps=s.iterations, callback=callback,
                       generator=seed_generator(seed, "objective"), decode=self.decode, keep_best=s.keep_best,
                       grad_clip=s.grad_clip, checkpoint=self.checkpoint, grad_scaler=self.grad_scaler())
        info = {"parameterisation": s.parameterisation, "decorrelate": s.decorrelate,
                "latent_shape": list(latent.shape), "pixels": s.width * s.height}
        if out.best_step is not None:
            info["best_step"] = out.best_step
        return GenerationResult(images=self.decode(latent), losses=out.losses, info=info,
                                interrupted=out.interrupted, steps_done=out.steps_done, stopped_at=out.stopped_at)


__all__ = ["PixelsGenerator", "PixelsSettings", "PARAMETERISATIONS"]
