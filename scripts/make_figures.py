#!/usr/bin/env python
"""Regenerate the README's figures (``docs/images/``) on the toy models, through the public run API.

    python scripts/make_figures.py                  # writes docs/images/*.png (refuses to replace them)
    python scripts/make_figures.py --overwrite      # regenerate the committed figures

Every image comes from ``generators.runs.generate(prompt, backend=..., preset="toy", seed=0)``, the
API behind ``scripts/generate.py``; the equivalent command line of each is printed. Figures:

* ``toy_grid.png``: rows VQGAN+CLIP, Stable Diffusion without CLIP guidance, Stable Diffusion with
  CLIP guidance; columns a few prompts; under each image what the pixel judge (``toyworld.judge``)
  sees and the CLIP score under the judging toy CLIP ``clip_b``. SD rows are left out, with a
  message, while ``toyworld/weights/sd`` is missing.
* ``loss_curve.png``: the loss history (``run.metadata["losses"]``) of the VQGAN+CLIP run of the
  first prompt, drawn with PIL.
* ``vqgan_frames.png``: frames of that same run (``save_every``) up to the final image.

Deterministic: fixed prompts and seed, one CPU thread, CPU by default.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from toyworld.variants import Variant, variant

ROOT = Path(__file__).resolve().parent.parent   # the checkout: docs/images is written there
OUT_DIR = ROOT / "docs" / "images"
SEED = 0
PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle on a purple background",
    "a white square on a green background",
    "an orange cross on a black background",
)
# The grid's rows, as the README describes them: rows of the quality benchmark's variants table
# (label, backend and options defined once, in toyworld/variants.py).
ROWS: tuple[Variant, ...] = tuple(variant(name) for name in ("vqgan+clip", "sd", "sd+clip", "pixels+clip", "noise+clip"))
FIGURES = {"grid": "toy_grid.png", "loss": "loss_curve.png", "frames": "vqgan_frames.png"}
FRAMES = 8  # frames in the strip before the final image
SCALE = 2  # 64-pixel toy images are shown at 128 pixels (nearest neighbour)

INK = (30, 30, 30)
GREY = (120, 120, 120)
LIGHT = (225, 225, 225)
GOOD = (20, 120, 40)
BAD = (170, 40, 40)
PAPER = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Drawing helpers (PIL only)
# ---------------------------------------------------------------------------------------------

def font(size: int = 13):
    """PIL's default font (at *size* where this Pillow can scale it)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, fnt, width: int) -> list[str]:
    """*text* broken into lines no wider than *width* pixels."""
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=fnt) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def line_height(fnt) -> int:
    box = fnt.getbbox("Ag")
    return int(box[3] - box[1]) + 4


def enlarge(image, scale: int = SCALE):
    from PIL import Image

    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1-2-5 steps)."""
    import math

    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        ticks.append(round(t, 10))
        t += step
    return ticks


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def grid_figure(cells: dict[tuple[int, int], dict], rows: Sequence[str], prompts: Sequence[str], *, note: str):
    """Images in a rows x prompts grid; prompt above each column, row label at left, judge + score below."""
    from PIL import Image, ImageDraw

    head, body, small = font(14), font(13), font(12)
    side = 64 * SCALE
    pad, label_w = 10, 150
    col_w = side + 2 * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = [wrap(probe, f'"{p}"', body, col_w - 6) for p in prompts]
    header_h = max(len(h) for h in header) * line_height(body) + 2 * pad
    caption_h = 2 * line_height(small) + 6
    row_h = side + caption_h + pad
    notes = wrap(probe, note, small, label_w + col_w * len(prompts) - 2 * pad)
    width = label_w + col_w * len(prompts)
    height = header_h + row_h * len(rows) + len(notes) * line_height(small) + 2 * pad
    fig = Image.new("RGB", (width, height), PAPER)
    d = ImageDraw.Draw(fig)
    for j, lines in enumerate(header):
        x0 = label_w + j * col_w
        for k, line in enumerate(lines):
            w = d.textlength(line, font=body)
            d.text((x0 + (col_w - w) / 2, pad + k * line_height(body)), line, fill=INK, font=body)
    for i, label in enumerate(rows):
        y0 = header_h + i * row_h
        for k, line in enumerate(wrap(d, label, head, label_w - 2 * pad)):
            d.text((pad, y0 + side / 2 - line_height(head) + k * line_height(head)), line, fill=INK, font=head)
        for j in range(len(prompts)):
            x0 = label_w + j * col_w + pad
            cell = cells.get((i, j))
            if cell is None:
                d.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], outline=LIGHT)
                continue
            fig.paste(enlarge(cell["image"]), (int(x0), int(y0)))
            d.rectangle([x0 - 1, y0 - 1, x0 + side, y0 + side], outline=LIGHT)
            colour = GOOD if cell["all_right"] else BAD
            d.text((x0, y0 + side + 3), cell["verdict"], fill=colour, font=small)
            d.text((x0, y0 + side + 3 + line_height(small)), cell["score"], fill=GREY, font=small)
    y = header_h + row_h * len(rows) + pad // 2
    for line in notes:
        d.text((pad, y), line, fill=GREY, font=small)
        y += line_height(small)
    return fig


def loss_figure(losses: Sequence[float | None], *, title: str, size: tuple[int, int] = (640, 380)):
    """A line plot of *losses* against the iteration, with axes, ticks and labels."""
    from PIL import Image, ImageDraw

    values = [(i + 1, float(v)) for i, v in enumerate(losses) if v is not None]
    if not values:
        raise ValueError("the run recorded no finite losses to plot")
    w, h = size
    left, right, top, bottom = 70, 20, 44, 50
    fig = Image.new("RGB", size, PAPER)
    d = ImageDraw.Draw(fig)
    f, small = font(13), font(12)
    lo, hi = min(v for _, v in values), max(v for _, v in values)
    yt = nice_ticks(lo, hi)
    ymin, ymax = yt[0], yt[-1]
    xt = nice_ticks(0, len(losses), 6)
    xmax = xt[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (w - left - right) * x / xmax,
                h - bottom - (h - top - bottom) * (y - ymin) / (ymax - ymin))

    for t in yt:  # grid lines and y ticks
        _, y = px(0, t)
        d.line([(left, y), (w - right, y)], fill=LIGHT)
        label = f"{t:g}"
        d.text((left - 8 - d.textlength(label, font=small), y - 7), label, fill=INK, font=small)
    for t in xt:
        x, _ = px(t, ymin)
        d.line([(x, h - bottom), (x, h - bottom + 5)], fill=INK)
        label = f"{t:g}"
        d.text((x - d.textlength(label, font=small) / 2, h - bottom + 8), label, fill=INK, font=small)
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill=INK, width=1)  # axes
    d.line([px(x, y) for x, y in values], fill=(40, 80, 200), width=2)
    xl = "iteration"
    d.text(((left + w - right) / 2 - d.textlength(xl, font=f) / 2, h - 24), xl, fill=INK, font=f)
    ylabel = Image.new("RGB", (140, 18), PAPER)
    ImageDraw.Draw(ylabel).text((0, 0), "CLIP loss", fill=INK, font=f)
    ylabel = ylabel.rotate(90, expand=True)
    fig.paste(ylabel, (8, int((top + h - bottom) / 2 - 70)))
    for k, line in enumerate(wrap(d, title, f, w - 20)):
        d.text((10, 8 + k * line_height(f)), line, fill=INK, font=f)
    return fig


def strip_figure(frames: Sequence, steps: Sequence[int], *, title: str):
    """Frames side by side, each labelled with its iteration."""
    from PIL import Image, ImageDraw

    f, small = font(13), font(12)
    side, pad = 64 * SCALE, 8
    title_h = line_height(f) + 2 * pad
    width = pad + len(frames) * (side + pad)
    fig = Image.new("RGB", (width, title_h + side + line_height(small) + 2 * pad), PAPER)
    d = ImageDraw.Draw(fig)
    d.text((pad, pad), title, fill=INK, font=f)
    for k, (frame, step) in enumerate(zip(frames, steps)):
        x = pad + k * (side + pad)
        fig.paste(enlarge(frame), (x, title_h))
        label = f"step {step}"
        d.text((x + (side - d.textlength(label, font=small)) / 2, title_h + side + 4), label, fill=INK, font=small)
    return fig


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def cli_command(prompt: str, backend: str, options: dict[str, Any], seed: int) -> str:
    """The ``scripts/generate.py`` command line that gives the same image."""
    parts = ["python", "scripts/generate.py", prompt, "--preset", "toy", "--backend", backend, "--seed", str(seed)]
    for key, value in options.items():
        parts += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def judge_caption(image, prompt_attrs: dict[str, str]) -> tuple[str, bool]:
    """(what the pixel judge sees, as 'colour shape / background'; whether all three are as asked)."""
    from toyworld.judge import judge

    j = judge(image)
    seen = f"{j.colour or '?'} {j.shape or 'nothing'} / {j.background}"
    return seen, (j.colour, j.shape, j.background) == (prompt_attrs["colour"], prompt_attrs["shape"],
                                                      prompt_attrs["background"])


def attributes_of(prompt: str) -> dict[str, str]:
    from toyworld.world import all_full_captions

    for cap, colour, shape, background in all_full_captions():
        if cap == prompt:
            return {"colour": colour, "shape": shape, "background": background}
    raise ValueError(f"{prompt!r} is not a toy-world prompt 'a COLOUR SHAPE on a COLOUR background'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace figures that already exist")
    parser.add_argument("--seed", type=int, default=SEED, help="generation seed of every image (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device (default cpu: the committed figures are CPU runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--iterations", type=int, default=None, help="VQGAN+CLIP iterations (default: the toy preset's)")
    parser.add_argument("--steps", type=int, default=None, help="SD steps (default: the sd backend's)")
    args = parser.parse_args(argv)

    targets = {k: args.out / name for k, name in FIGURES.items()}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(existing)} already exist(s); pass --overwrite to regenerate them or --out NEW_DIR",
              file=sys.stderr)
        return 2
    from toyworld.paths import CLIPS, MODELS, weights_dir

    missing = {}
    for name in MODELS:
        try:
            weights_dir(name, check=True)
        except FileNotFoundError as err:
            missing[name] = str(err)
    for name in (*CLIPS, "vqgan"):
        if name in missing:
            print(f"error: {missing[name]}", file=sys.stderr)
            return 2
    rows = [v for v in ROWS if "sd" not in v.models or "sd" not in missing]
    if len(rows) < len(ROWS):
        print(f"skipping the Stable Diffusion rows: {missing['sd']}", file=sys.stderr)

    import torch

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    from generators.runs import generate

    hf_logging.disable_progress_bar()  # no per-model loading bars between the printed commands
    diffusers_logging.disable_progress_bar()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    try:
        extra = {"vqgan": {} if args.iterations is None else {"iterations": args.iterations},
                 "pixels": {} if args.iterations is None else {"iterations": args.iterations},
                 "noise": {} if args.iterations is None else {"iterations": args.iterations},
                 "sd": {} if args.steps is None else {"steps": args.steps}}
        cells: dict[tuple[int, int], dict] = {}
        first_vqgan = None
        print("commands (each gives the same image as its grid cell):")
        for i, row in enumerate(rows):
            label, backend = row.label, row.backend
            for j, prompt in enumerate(PROMPTS):
                opts = {**row.options, **extra[backend]}
                keep_frames = backend == "vqgan" and j == 0
                run_opts = dict(opts)
                if keep_frames:
                    total = args.iterations or _preset_iterations()
                    run_opts["save_every"] = max(1, total // FRAMES)
                t0 = time.perf_counter()
                run = generate(prompt, backend=backend, preset="toy", seed=args.seed, save=False, progress=False,
                               device=args.device, threads=args.threads, **run_opts)
                seen, right = judge_caption(run.images[0], attributes_of(prompt))
                score = "clip_b -" if run.clip_score is None else f"clip_b {run.clip_score:.1f}"
                cells[(i, j)] = {"image": run.image, "verdict": seen, "all_right": right, "score": score}
                print(f"  [{label}] {cli_command(prompt, backend, opts, args.seed)}"
                      f"   # judge: {seen}{' (as asked)' if right else ''}; {score}; {time.perf_counter() - t0:.1f}s")
                if keep_frames:
                    first_vqgan = (prompt, run_opts["save_every"], run)
        args.out.mkdir(parents=True, exist_ok=True)
        note = (f"Toy preset (64x64; toy CLIPs clip_a, clip_c, clip_d guide), seed {args.seed}. Under each image: what the pixel "
                "judge sees (colour shape / background; green = all three as asked) and the CLIP score under the "
                "independent judging toy CLIP clip_b.")
        grid = grid_figure(cells, [r.label for r in rows], PROMPTS, note=note)
        grid.save(targets["grid"], optimize=True)

        prompt, every, run = first_vqgan
        loss = loss_figure(run.losses, title=f'VQGAN+CLIP loss per iteration: "{prompt}", seed {args.seed} '
                                             f"(toy preset)")
        loss.save(targets["loss"], optimize=True)
        frames = list(run.frames) + [run.image]
        done = int(run.metadata.get("steps_done") or len(run.losses))
        steps = [every * (k + 1) for k in range(len(run.frames))] + [done]
        if len(steps) > 1 and steps[-2] == steps[-1]:  # the last saved frame is the final image
            frames, steps = frames[:-1], steps[:-1]
        strip = strip_figure(frames, steps, title=f'VQGAN+CLIP frames: "{prompt}", seed {args.seed} (toy preset)')
        strip.save(targets["frames"], optimize=True)
    finally:
        torch.set_num_threads(threads_before)
    print(f"  loss curve and frames: the [VQGAN+CLIP] run of {PROMPTS[0]!r} with --save-every {first_vqgan[1]}")
    print("wrote:")
    for p in targets.values():
        print(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} ({p.stat().st_size / 1024:.0f} KB)")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def _preset_iterations() -> int:
    from generators.runs.presets import get_preset

    return int(get_preset("toy", backend="vqgan").get("iterations", 100))


if __name__ == "__main__":
    sys.exit(main())
