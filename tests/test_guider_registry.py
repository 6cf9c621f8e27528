"""A guider registered from outside the package is one class plus its registration: its name joins
``--guider``'s choices and its own option appears in ``--help``, in the web form and in the sd backend's
settings, from which the guider is built (no model is loaded)."""

from dataclasses import dataclass

import pytest

from generators.base import option
from generators.cli import build_parser, parse_args
from generators.diffusion.guiders import GUIDERS, CLIPGuider, guider_from_settings, register_guider
from generators.runs.options import backend_settings, resolve_options
from webui.form import form_fields


@dataclass
class TiltOptions:
    """The test guider's one option."""

    tilt_strength: float = option(0.5, "tilted: how far the correction leans", minimum=0)


class TiltedGuider(CLIPGuider):
    """The clip rule with its correction multiplied by ``tilt`` (a stand-in for a user's rule)."""

    name = "tilted"
    Options = TiltOptions

    def __init__(self, objective=None, *, tilt: float = 0.5, **kwargs):
        super().__init__(objective, **kwargs)
        self.tilt = tilt

    @classmethod
    def settings_kwargs(cls, s):
        return {**super().settings_kwargs(s), "tilt": s.tilt_strength}


@pytest.fixture
def tilted():
    register_guider("tilted", TiltedGuider)
    try:
        yield TiltedGuider
    finally:
        GUIDERS.pop("tilted")


def test_a_guider_registered_later_is_in_the_help_and_its_option_too(tilted):
    text = build_parser().format_help()
    assert "tilted" in text.split("--guider {", 1)[1].split("}", 1)[0].split(",")
    assert "--tilt-strength TILT_STRENGTH" in text and "how far the correction leans" in text


def test_before_registration_neither_is_there():
    text = build_parser().format_help()
    assert "tilted" not in text and "--tilt-strength" not in text


def test_the_web_form_shows_the_guider_and_its_option(tilted):
    fields = {f.name: f for f in form_fields()}
    assert "tilted" in fields["guider"].choices
    assert fields["tilt_strength"].widget == "number" and "sd" in fields["tilt_strength"].owners


def test_the_option_reaches_the_guider_from_the_command_line(tilted):
    args = parse_args(["a red circle", "--backend", "sd", "--guider", "tilted", "--tilt-strength", "0.25"])
    backend, opts, _ = resolve_options(**args)
    settings = backend_settings(backend, opts)
    assert settings.guider == "tilted" and settings.tilt_strength == 0.25
    guider = guider_from_settings(settings.guider, None, settings)
    assert isinstance(guider, TiltedGuider) and guider.tilt == 0.25
    assert guider.gradient == settings.guidance_gradient        # the clip rule's own options still reach it


def test_a_bad_value_of_the_new_option_is_refused_like_any_other(tilted):
    args = parse_args(["a red circle", "--backend", "sd", "--guider", "tilted", "--tilt-strength", "-1"])
    with pytest.raises(ValueError, match="--tilt-strength .* at least 0"):
        resolve_options(**args)
