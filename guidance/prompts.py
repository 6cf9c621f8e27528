"""Weighted prompts: parsing ``"text:weight:stop|..."`` and prompt schedules.

A prompt is text, an image file or a seeded noise vector, with a weight (negative weights
push the image away) and a ``stop`` threshold below which its loss no longer pulls.
The syntax follows VQGAN-CLIP's ``|``-separated prompts; trailing ``:weight`` and
``:stop`` fields are recognised only when they are numbers, so text such as
``"time: 3pm"`` stays intact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence, Union

PromptKind = Literal["text", "image", "noise"]


@dataclass(frozen=True)
class Prompt:
    """One target: ``kind`` says how ``value`` becomes an embedding."""

    value: str
    weight: float = 1.0
    stop: float = -math.inf
    kind: PromptKind = "text"

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image", "noise"):
            raise ValueError(f"prompt kind {self.kind!r} is not one of text, image, noise")
        if not math.isfinite(self.weight):
            raise ValueError(f"prompt {self.value!r} has weight {self.weight}; use a finite number")
        if self.kind != "noise" and not self.value.strip():
            raise ValueError("empty prompt; give some text, e.g. 'a red fox'")
        if self.kind == "noise":
            int(self.value)  # noise prompts are seeds

    @property
    def label(self) -> str:
        """A short name for logs and metadata."""
        prefix = "" if self.kind == "text" else f"{self.kind}:"
        return f"{prefix}{self.value}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "weight": self.weight,
                "stop": None if self.stop == -math.inf else self.stop}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _ratio(head: str, last: str, kind: str = "text") -> bool:
    """``head:last`` is a digit-colon-digit ratio or time (``16:9``, ``10:30``): part of a text prompt."""
    return kind == "text" and head[-1:].isdigit() and last.strip()[:1].isdigit()


def _split_fields(spec: str, kind: str = "text") -> tuple[str, float, float]:
    """Split ``"text[:weight[:stop]]"``; only numeric trailing fields are taken, and never a digit-colon-digit
    ratio (``"a landscape in 16:9"`` is text; write ``"a landscape in 16:9 :2"`` to weight it)."""
    value, weight, stop = spec, 1.0, -math.inf
    head, sep, last = value.rpartition(":")
    if sep and _number(last) is not None and not head.strip():
        raise ValueError(f"empty prompt in {spec!r}: only a weight was given; write e.g. 'a red fox:{last}'")
    if sep and head.strip() and _number(last) is not None:
        head2, sep2, before = head.rpartition(":")
        if sep2 and head2.strip() and _number(before) is not None and not _ratio(head2, before, kind):
            value, weight, stop = head2, float(before), float(last)
        elif not _ratio(head, last, kind):
            value, weight = head, float(last)
    if not math.isfinite(weight):
        raise ValueError(f"prompt {spec!r}: weight {weight} is not a finite number")
    if not math.isfinite(stop) and stop != -math.inf:
        raise ValueError(f"prompt {spec!r}: stop {stop} is not a finite number")
    return value.strip(), weight, stop


def parse_prompt(spec: str, kind: PromptKind = "text") -> Prompt:
    """Parse one ``"value[:weight[:stop]]"`` field into a :class:`Prompt`."""
    value, weight, stop = _split_fields(spec, kind)
    if not value:
        raise ValueError(f"empty prompt in {spec!r}; write e.g. 'a red fox:1.5'")
    if kind == "noise" and _number(value) is None:
        raise ValueError(f"noise prompt {spec!r} must be an integer seed, e.g. '42:0.5'")
    if kind == "noise":
        value = str(int(float(value)))
    return Prompt(value=value, weight=weight, stop=stop, kind=kind)


def parse_prompts(spec: str | Prompt | Iterable[str | Prompt] | None, kind: PromptKind = "text") -> list[Prompt]:
    """Parse ``"a red fox:1.5|snowy forest:0.5|blurry:-1"`` (or a list of such) into prompts."""
    if spec is None:
        return []
    if isinstance(spec, Prompt):
        return [spec]
    if not isinstance(spec, (str, list, tuple)) or (not isinstance(spec, str) and
                                                   not all(isinstance(i, (str, Prompt)) for i in spec)):
        raise TypeError(f"prompts must be text ('a red fox:1.5|blurry:-1'), a list of such strings or Prompt "
                        f"objects; got {type(spec).__name__} {spec!r:.60}")
    items = spec.split("|") if isinstance(spec, str) else list(spec)
    prompts: list[Prompt] = []
    for item in items:
        if isinstance(item, Prompt):
            prompts.append(item)
        elif item.strip():
            prompts.append(parse_prompt(item, kind))
        elif isinstance(spec, str) and len(items) > 1:
            raise ValueError(f"empty prompt between '|' separators in {spec!r}")
    if not prompts and isinstance(spec, str):
        raise ValueError("empty prompt; give some text, e.g. 'a red fox'")
    return prompts


def image_prompts(specs: Iterable[str]) -> list[Prompt]:
    """Image prompts ``"path[:weight[:stop]]"``; the file must exist and be an image."""
    prompts = [parse_prompt(s, "image") for s in specs]
    from .images import check_image_file

    for p in prompts:
        check_image_file(p.value, what="image prompt")
    return prompts


PromptSpec = Union[str, Prompt, Sequence[Union[str, Prompt]]]


class PromptSchedule:
    """Prompt sets that change during a run: ``{0: "a forest", 100: "a city"}``.

    ``at(step)`` returns the set whose start step is the largest one ``<= step``
    (VQGAN-CLIP's "story mode"). With a *period*, the schedule repeats: step ``s`` reads the set of
    ``s % period`` (nerdyrodent's ``--change_prompt_every`` loops back to the first phrase).
    """

    def __init__(self, schedule: PromptSpec | Mapping[int, PromptSpec], period: int | None = None):
        if isinstance(schedule, Mapping):
            entries = {int(k): parse_prompts(v) for k, v in schedule.items()}
        else:
            entries = {0: parse_prompts(schedule)}
        if not entries:
            raise ValueError("empty prompt schedule; give at least one prompt")
        if 0 not in entries:
            raise ValueError(f"prompt schedule starts at step {min(entries)}; it must give prompts for step 0")
        for start, prompts in entries.items():
            if start < 0:
                raise ValueError(f"prompt schedule step {start} is negative")
            if not prompts:
                raise ValueError(f"prompt schedule step {start} has no prompts")
        if period is not None and not max(entries) < period:
            raise ValueError(f"prompt schedule period {period} must be after its last start step {max(entries)}")
        self.entries: dict[int, list[Prompt]] = dict(sorted(entries.items()))
        self.period = period

    def at(self, step: int) -> list[Prompt]:
        if self.period:
            step %= self.period
        current = self.entries[0]
        for start, prompts in self.entries.items():
            if start <= step:
                current = prompts
        return current

    def all_prompts(self) -> list[Prompt]:
        seen: dict[Prompt, None] = {}
        for prompts in self.entries.values():
            seen.update(dict.fromkeys(prompts))
        return list(seen)

    def positive_text(self, step: int = 0) -> str:
        """The positive-weight text prompts active at *step*, joined with ", " ("" when there are none):
        what a text-conditioned generator is conditioned on and what a run is scored against."""
        return ", ".join(p.value for p in self.at(step) if p.kind == "text" and p.weight > 0)

    def as_dict(self) -> dict[int, list[dict]]:
        return {k: [p.as_dict() for p in v] for k, v in self.entries.items()}


def parse_schedule(spec: str) -> PromptSchedule:
    """Parse ``"0=a forest|fog:0.5; 100=a city"`` into a :class:`PromptSchedule`.

    Without any ``N=`` prefix the whole string is one prompt set from step 0.
    """
    parts = [p for p in spec.split(";") if p.strip()]
    entries: dict[int, list[Prompt]] = {}
    for part in parts:
        step, sep, rest = part.partition("=")
        if sep and step.strip().isdigit():
            entries[int(step)] = parse_prompts(rest)
        elif len(parts) == 1:
            entries[0] = parse_prompts(part)
        else:
            raise ValueError(f"schedule entry {part.strip()!r} needs a step: write 'STEP=prompts', e.g. '100=a city'")
    return PromptSchedule(entries)
