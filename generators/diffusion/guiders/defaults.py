"""Each guider's default settings by profile (``--guider-defaults``): clipsteer's own, the reference's, the toy's.

A guider's settings (its strength ``clip_guidance_scale``, its gradient and step-size rules, TFG's
schedules and smoothing, the sampler's eta) left unset (``None``) by the user, the config file and
the preset are filled from the profile of the chosen guider, so ``--guider tfg`` alone runs TFG at
TFG's own strength, never at the clip rule's (issue 30, item 8). An explicit value always wins; an
explicit strength of 0 turns every guider off (its profiled backward steps too).

Profiles:

- ``clipsteer`` (default): the project's own choices. Strengths other than the clip rule's were
  chosen on the toy world's tuning set (``benchmarks/tune_guiders.py --grid toy-v2``, the
  settings in README's quality table) and have not been measured on a real Stable Diffusion.
- ``toy`` (what ``--preset toy`` selects): ``clipsteer`` with the strengths chosen for the toy SD of toy
  world v3 on its tuning prompts (clip 50, mpgd 10, freedom 0.2, ugd forward 150; see ``_TOY`` below).
- ``paper``: each guider's reference rule and the defaults of its reference code (cited per entry;
  docs/guiders.md lists them with every deviation of the other profiles).
"""

from __future__ import annotations

from typing import Any

PROFILES = ("clipsteer", "paper", "toy")
#: the settings field of a guider's strength (``--clip-guidance-scale``, a name kept for the command line and
#: run.json); the profiles below call it ``scale``, the guiders' own name for it
STRENGTH_FIELD = "clip_guidance_scale"

# The value of every profiled setting when neither the profile nor the user gives one.
BASE: dict[str, Any] = {
    "scale": 100.0, "guidance_gradient": "x0", "guidance_prediction": "cfg", "step_rule": "scale",
    "guidance_schedule": "constant", "backward_steps": 0, "backward_lr": 0.1, "backward_schedule": "constant",
    "smoothing": 0.0, "smoothing_schedule": "constant", "smoothing_samples": 1, "ddim_eta": 0.0,
}

# clipsteer's own defaults; strengths chosen by `python benchmarks/tune_guiders.py --grid toy-v2` on the toy tuning
# set (docs/benchmarks.md, "How the toy settings were chosen").
_CLIPSTEER: dict[str, dict[str, Any]] = {
    "none": {"scale": 0.0},
    # the clip rule's fast mode (gradient stopped at the clean estimate); the community pipeline scores the
    # conditional pass, so this guider does too
    "clip": {"scale": 100.0, "guidance_gradient": "x0", "guidance_prediction": "conditional"},
    "dps": {"scale": 1.0, "step_rule": "scale"},
    "mpgd": {"scale": 50.0},
    "freedom": {"scale": 0.5, "step_rule": "relative"},
    "ugd": {"scale": 100.0, "guidance_gradient": "x0", "backward_steps": 2, "backward_lr": 1.0},
    "tfg": {"scale": 5.0, "backward_steps": 2, "backward_lr": 10.0, "backward_schedule": "decreasing"},
}

# The toy SD of toy world v3 (compositional prompts): `python benchmarks/tune_guiders.py --grid toy-v3
# --per-category 3` on the tuning set (15 images a setting, overall accuracy; docs/benchmarks.md, "How the toy
# settings were chosen"). The clip rule lifts no category there (scale 0 and 50: 40.0%, 150: 33.3%, 500: 26.7%), so
# its toy strength is the mildest tried; mpgd 10 (40.0%) beat 50 (20.0%), freedom 0.2 (46.7%) beat 0.5 (33.3%);
# ugd's forward strength 150 (46.7%) beat 500 with lr 5 (40.0%); dps (53.3% at 0.3, 1 and 3) and tfg (rho 5, mu 10
# decreasing: 66.7%, the best setting) keep clipsteer's.
_TOY: dict[str, dict[str, Any]] = {
    **_CLIPSTEER,
    "clip": {**_CLIPSTEER["clip"], "scale": 50.0},
    "mpgd": {**_CLIPSTEER["mpgd"], "scale": 10.0},
    "freedom": {**_CLIPSTEER["freedom"], "scale": 0.2},
    "ugd": {**_CLIPSTEER["ugd"], "scale": 150.0},
}

_PAPER: dict[str, dict[str, Any]] = {
    "none": {"scale": 0.0},
    # diffusers examples/community/clip_guided_stable_diffusion.py: cond_fn (gradient through the conditional
    # UNet pass, loss on the blend sqrt(1-ab) x0 + (1 - sqrt(1-ab)) x_t; sigma^2 * grad moves for LMS),
    # __call__ defaults clip_guidance_scale=100, eta=0
    "clip": {"scale": 100.0, "guidance_gradient": "community", "guidance_prediction": "conditional"},
    # Training-Free-Guidance methods/dps.py L34-37: the step divided by |log p| (the DPS paper's zeta_t = zeta' /
    # ||y - A(x0)||); utils/configs.py: guidance_strength 1.0, eta 1.0 (DDPM-like ancestral DDIM)
    "dps": {"scale": 1.0, "step_rule": "loss", "ddim_eta": 1.0},
    # Training-Free-Guidance methods/mpgd.py L36; utils/configs.py guidance_strength 1.0, eta 1.0
    "mpgd": {"scale": 1.0, "ddim_eta": 1.0},
    # FreeDoM SD_style/ldm/models/diffusion/ddim.py L263: rho = 0.2 * rms(w (eps_c - eps_u)) / rms(grad), the DDPM
    # posterior step (L266-270, DDIM eta 1). Its guidance window (steps 30-70 of 100) and time-travel (3 repeats in
    # steps 30-60) are not profiled: --guidance-start 0.3 --guidance-end 0.7 --recurrence 3 --scheduler ddim
    "freedom": {"scale": 0.2, "step_rule": "cfg", "ddim_eta": 1.0},
    # Universal-Guided-Diffusion stable-diffusion-guided/ldm/models/diffusion/ddim_with_grad.py L129-168: forward
    # guidance through the CFG-combined UNet output; README's SD style transfer: --optim_forward_guidance_wt 6
    # (its recurrence --optim_num_steps 6 is not profiled: --recurrence 6 --scheduler ddim); no backward guidance
    # on SD, as Training-Free-Guidance's ugd.py with its default iter_steps 1
    "ugd": {"scale": 6.0, "guidance_gradient": "full", "backward_steps": 0},
    # Training-Free-Guidance scripts/style_transfer.sh (its SD task): rho 0.25, mu 2, sigma 0.1, eps_bsz 1,
    # iter_steps 4, eta 1.0; utils/configs.py: rho/mu schedules 'increase', sigma schedule 'decrease'
    "tfg": {"scale": 0.25, "backward_steps": 4, "backward_lr": 2.0, "smoothing": 0.1,
            "smoothing_samples": 1, "guidance_schedule": "increasing", "backward_schedule": "increasing",
            "smoothing_schedule": "decreasing", "ddim_eta": 1.0},
}

DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"clipsteer": _CLIPSTEER, "paper": _PAPER, "toy": _TOY}


def guider_defaults(guider: str, profile: str = "clipsteer") -> dict[str, Any]:
    """Every profiled setting of *guider* under *profile* (a guider the profile does not know gets ``BASE``)."""
    if profile not in DEFAULTS:
        raise ValueError(f"unknown guider_defaults {profile!r}; choose {', '.join(PROFILES)}")
    values = {**BASE, **DEFAULTS[profile].get(guider, {})}
    return {STRENGTH_FIELD if k == "scale" else k: v for k, v in values.items()}


def profile_summary(profile: str) -> str:
    """*profile*'s per-guider values in one line (``--help``): ``clip: scale 100, guidance-gradient community; ...``."""
    parts = []
    for guider, values in DEFAULTS[profile].items():
        if guider == "none":
            continue
        shown = ", ".join(f"{k.replace('_', '-')} {v:g}"
                          if isinstance(v, float) else f"{k.replace('_', '-')} {v}" for k, v in values.items())
        parts.append(f"{guider}: {shown}")
    return "; ".join(parts)


def fill_guider_defaults(settings, *, guider: str, profile: str) -> None:
    """Set every profiled field of *settings* that is ``None`` to *guider*'s default under *profile*.

    A strength of 0 given by the user turns the guider off: its profile's backward steps (UGD, TFG) are then 0
    too, unless the user asked for backward steps as well (backward guidance alone)."""
    values = guider_defaults(guider, profile)
    if getattr(settings, STRENGTH_FIELD, None) == 0:
        values["backward_steps"] = 0
    for name, value in values.items():
        if hasattr(settings, name) and getattr(settings, name) is None:
            setattr(settings, name, value)


__all__ = ["PROFILES", "BASE", "DEFAULTS", "guider_defaults", "fill_guider_defaults", "profile_summary"]
