"""Does the drawing follow the attention? Layout guidance on the toy SD: ``python benchmarks/layout_attention.py --help``.

Layout guidance (``--layout``) moves the latents until each subject's cross-attention lies inside its box. This
measures, on the position prompts of a toy-world prompt set (one image each, the ``sd`` backend's toy preset, no
CLIP guidance), how far the attention moved and how far the drawn objects followed, for three starts:

- ``unguided``: layout guidance's loss is only read (step size 1e-12: nothing moves);
- ``guided``: layout guidance as the ``sd+layout`` benchmark row runs it;
- ``sketch``: no guidance (the loss read as in ``unguided``), the run started from the layout sketch
  (``--layout-sketch auto --strength 0.7``, as the ``sd+sketch`` row).

Per start the JSON reports the layout loss (the mean over subjects and maps of ``(1 - attention share inside the
box)^2``) at the first and at the last steered step, the share of images right by the world's rule, and the share
where each named object (its shape and colour, as the rule finds it) has its centre inside its box. An analysis of
the method, never part of it.

    python benchmarks/layout_attention.py --prompt-set tuning --per-category 16 --json layout.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toy_quality.runner import SEED_BASES, _write_json, benchmark_prompts, start_analysis

READ_ONLY = {"layout_scale": 1e-12, "layout_iterations": 1, "layout_threshold": 0.0}
STARTS = {"unguided": READ_ONLY, "guided": {},
          "sketch": {**READ_ONLY, "layout_sketch": "auto", "strength": 0.7}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-set", default="tuning", choices=sorted(SEED_BASES), help="tuning (default) or benchmark")
    p.add_argument("--per-category", type=int, default=16, metavar="N", help="position prompts (default 16)")
    p.add_argument("--starts", nargs="+", choices=list(STARTS), default=list(STARTS), help="which starts (default: all)")
    p.add_argument("--json", type=Path, required=True, help="where to write the results (not overwritten)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def objects_in_boxes(prompt, read, width: int, height: int) -> list[bool]:
    """Per named object of *prompt*: does an object of its shape and colour, as the rule reads the image, have
    its centre inside the object's box of the automatic layout?"""
    from generators.diffusion.layout_guidance import auto_layout

    out = []
    for (colour, shape), (_, (x0, y0, x1, y1)) in zip(prompt.objects, auto_layout(prompt.text)):
        centres = [((o.box[0] + o.box[2]) / 2 / width, (o.box[1] + o.box[3]) / 2 / height)
                   for o in read.objects if o.shape == shape and o.colour == colour]
        out.append(any(x0 <= cx <= x1 and y0 <= cy <= y1 for cx, cy in centres))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    report = start_analysis("layout_attention.py", args.json, args.threads, argv)
    if report is None:
        return 2
    from generators.runs import generate
    from toyworld.rule import matches, read_images

    prompts = benchmark_prompts(args.prompt_set, args.per_category, ["position"])
    seed = SEED_BASES[args.prompt_set]
    report.update({"prompt_set": args.prompt_set, "seed": seed, "rows": [], "summary": {}})
    for start in args.starts:
        rows = []
        for p in prompts:
            run = generate(p.text, backend="sd", preset="toy", seed=seed, save=False, progress=False, eval_model="none",
                           threads=args.threads, clip_guidance_scale=0.0, layout="auto", **STARTS[start])
            layout = run.record.info["layout"]
            read = read_images(run.images)[0]
            inside = objects_in_boxes(p, read, run.images.shape[-1], run.images.shape[-2])
            rows.append({"start": start, "prompt": p.text, "loss_first": layout["loss_first"],
                         "loss_last": layout["loss_last"], "right": bool(matches(p, read.background, read.objects)),
                         "in_box": inside})
            print(f"[{start}] {p.text!r}: loss {layout['loss_first']:.3f} -> {layout['loss_last']:.3f}; objects in "
                  f"their boxes {sum(inside)}/2; {'right' if rows[-1]['right'] else 'wrong'}", file=sys.stderr)
        n = len(rows)
        report["rows"] += rows
        report["summary"][start] = {
            "images": n, "loss_first": sum(r["loss_first"] for r in rows) / n,
            "loss_last": sum(r["loss_last"] for r in rows) / n, "right": sum(r["right"] for r in rows) / n,
            "both_in_box": sum(all(r["in_box"]) for r in rows) / n,
            "objects_in_box": sum(sum(r["in_box"]) for r in rows) / (2 * n)}
        _write_json(args.json, report)
    print("start      loss first  loss last  objects in box  both in box  right")
    for start, s in report["summary"].items():
        print(f"{start:<10} {s['loss_first']:>10.3f} {s['loss_last']:>10.3f} {s['objects_in_box']:>15.0%} "
              f"{s['both_in_box']:>12.0%} {s['right']:>6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
