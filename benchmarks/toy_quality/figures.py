"""The quality benchmark's two pictures, drawn with PIL only: overall accuracy against seconds per image,
and per-category accuracy as grouped bars, both with their 95% intervals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from toyworld.variants import VARIANTS


PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
               (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127), (0, 0, 128), (0, 128, 96),
               (230, 171, 2), (102, 0, 51), (255, 187, 120), (120, 200, 110)]


def _colour(k: int) -> tuple[int, int, int]:
    """The k-th plot colour: the palette, then the palette darkened (for more variants than colours)."""
    base = PLOT_COLOURS[k % len(PLOT_COLOURS)]
    return base if (k // len(PLOT_COLOURS)) % 2 == 0 else tuple(int(c * 0.5) for c in base)


def _ranked(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Variant names, best overall first (the legends' order)."""
    return sorted(summary, key=lambda name: -summary[name]["overall"])


def _legend_height(size, top: int, n: int) -> tuple[int, int]:
    """*size* made tall enough for a legend of *n* entries, 20 px apart, below *top*."""
    return size[0], max(size[1], top + 20 * n + 20)


def _font():
    """PIL's default font at 13 px."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _legend_room(size, right: int, legend: list[str]) -> tuple[tuple[int, int], int]:
    """*size* and *right* widened so that the longest legend entry (drawn 30 px into the right margin) fits."""
    need = 30 + int(max((_font().getlength(text) for text in legend), default=0)) + 12
    grow = max(0, need - right)
    return (size[0] + grow, size[1]), right + grow


def _canvas(size):
    """A white PIL image of *size*, its drawing context and the default font at 13 px."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    return image, ImageDraw.Draw(image), _font()


def quality_vs_time_figure(summary: dict[str, dict[str, Any]], *, title: str = "", size=(1000, 500)):
    """Overall accuracy (the mean of the five categories) against seconds per image (log scale), one point
    per variant with its 95% interval as a vertical bar. PIL only."""
    left, right, top, bottom = 70, 400, 40, 60
    points = [(name, summary[name]) for name in _ranked(summary) if summary[name].get("seconds_per_image")]
    labels = {v.name: v.label for v in VARIANTS}
    size = _legend_height(size, top, len(points))
    size, right = _legend_room(size, right, [f"{labels.get(n, n)} ({s['overall']:.0%})" for n, s in points])
    width, height = size
    image, draw, font = _canvas(size)
    secs = [s["seconds_per_image"] for _, s in points] or [1.0]
    lo_t, hi_t = math.log10(min(secs) / 1.5), math.log10(max(secs) * 1.5)
    if hi_t - lo_t < 1:
        mid = (hi_t + lo_t) / 2
        lo_t, hi_t = mid - 0.5, mid + 0.5

    def xy(seconds: float, share: float) -> tuple[float, float]:
        x = left + (math.log10(seconds) - lo_t) / (hi_t - lo_t) * (width - left - right)
        return x, top + (1 - share) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline=(30, 30, 30))
    for share in (0, 0.25, 0.5, 0.75, 1.0):
        x0, y = xy(10 ** lo_t, share)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{share:.0%}", fill=(30, 30, 30), font=font, anchor="rm")
    for exponent in range(math.floor(lo_t), math.ceil(hi_t) + 1):
        for mult in (1, 2, 5):
            seconds = mult * 10 ** exponent
            if lo_t <= math.log10(seconds) <= hi_t:
                x, _ = xy(seconds, 0)
                draw.line([x, height - bottom, x, height - bottom + 4], fill=(30, 30, 30))
                draw.text((x, height - bottom + 6), f"{seconds:g}", fill=(30, 30, 30), font=font, anchor="mt")
    draw.text(((left + width - right) / 2, height - 30), "seconds per image (1 CPU thread, log scale)",
              fill=(30, 30, 30), font=font, anchor="mm")
    draw.text((12, top - 22), "overall accuracy (mean of the five categories, judged by the rule)", fill=(30, 30, 30), font=font)
    if title:
        draw.text((width - 12, height - 4), title, fill=(120, 120, 120), font=font, anchor="rs")

    def marker(x: float, y: float, k: int, colour) -> None:    # circle, square, diamond: told apart in grey too
        box = [x - 5, y - 5, x + 5, y + 5]
        if k % 3 == 0:
            draw.ellipse(box, fill=colour)
        elif k % 3 == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=colour)

    for k, (name, s) in enumerate(points):
        colour = _colour(k)
        x, y = xy(s["seconds_per_image"], s["overall"])
        low, high = s.get("overall_ci95") or (s["overall"],) * 2
        _, y_low = xy(s["seconds_per_image"], low)
        _, y_high = xy(s["seconds_per_image"], high)
        draw.line([x, y_low, x, y_high], fill=colour, width=2)
        for yy in (y_low, y_high):
            draw.line([x - 4, yy, x + 4, yy], fill=colour, width=2)
        marker(x, y, k, colour)
        ly = top + 10 + 20 * k
        marker(width - right + 19, ly, k, colour)
        draw.text((width - right + 30, ly), f"{labels.get(name, name)} ({s['overall']:.0%})",
                  fill=(30, 30, 30), font=font, anchor="lm")
    return image


def category_bars_figure(summary: dict[str, dict[str, Any]], *, title: str = "", size=(1400, 480)):
    """Per-category accuracy of each variant as grouped bars (one group per category, then overall), with
    the 95% intervals as whiskers. PIL only."""
    from toyworld.prompts import CATEGORIES

    left, right, top, bottom = 60, 430, 40, 50
    names = _ranked(summary)
    labels = {v.name: v.label for v in VARIANTS}
    size = _legend_height(size, top, len(names))
    size, right = _legend_room(size, right, [f"{labels.get(n, n)} ({summary[n]['overall']:.0%})" for n in names])
    width, height = size
    image, draw, font = _canvas(size)
    groups = [*CATEGORIES, "overall"]
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(share: float) -> float:
        return top + (1 - share) * plot_h

    draw.rectangle([left, top, width - right, height - bottom], outline=(30, 30, 30))
    for share in (0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(share)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{share:.0%}", fill=(30, 30, 30), font=font, anchor="rm")
    group_w = plot_w / len(groups)
    bar_w = max(2.0, (group_w - 12) / max(len(names), 1))
    for g, group in enumerate(groups):
        x0 = left + g * group_w + 6
        draw.text((x0 + (group_w - 12) / 2, height - bottom + 8), group, fill=(30, 30, 30), font=font, anchor="mt")
        for k, name in enumerate(names):
            s = summary[name]
            if group == "overall":
                value, (low, high) = s["overall"], s["overall_ci95"]
            elif group in s["categories"]:
                c = s["categories"][group]
                value, (low, high) = c["accuracy"], c["ci95"]
            else:
                continue
            colour = _colour(k)
            xa = x0 + k * bar_w
            draw.rectangle([xa, y_of(value), xa + bar_w - 1, y_of(0)], fill=colour)
            xm = xa + bar_w / 2
            draw.line([xm, y_of(low), xm, y_of(high)], fill=(60, 60, 60), width=1)
    for k, name in enumerate(names):
        ly = top + 10 + 20 * k
        draw.rectangle([width - right + 14, ly - 5, width - right + 24, ly + 5], fill=_colour(k))
        draw.text((width - right + 30, ly), f"{labels.get(name, name)} ({summary[name]['overall']:.0%})",
                  fill=(30, 30, 30), font=font, anchor="lm")
    draw.text((12, top - 22), "accuracy per category (judged by the rule; whiskers: 95% intervals)", fill=(30, 30, 30), font=font)
    if title:
        draw.text((width - 12, height - 4), title, fill=(120, 120, 120), font=font, anchor="rs")
    return image


def save_figures(summary: dict, figure: Path, bars: Path, title: str) -> None:
    """Write both pictures (either path may be 'none')."""
    for path, make in ((figure, quality_vs_time_figure), (bars, category_bars_figure)):
        if str(path).lower() != "none" and summary:
            path.parent.mkdir(parents=True, exist_ok=True)
            make(summary, title=title).save(path)
            print(f"figure: {path}")
