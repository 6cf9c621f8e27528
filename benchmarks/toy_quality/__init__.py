"""The quality benchmark on toy world v3 (``python benchmarks/quality.py``), in parts:

- ``toyworld.variants``: the variants table (``Variant``, ``VARIANTS``), shared with ``scripts/make_figures.py``;
- ``runner``: prompt sets, toy models, the generate -> judge -> score loop, reference scores;
- ``summary``: Wilson intervals, the per-variant summary, lifts over unguided SD, targets, the table;
- ``figures``: the two PIL pictures;
- ``cli``: the command line (``parse_args``, ``main``, ``--merge``).

Imported as ``benchmarks.toy_quality`` from the checkout's root (the tests), or as ``toy_quality`` by the
scripts in ``benchmarks/`` (their own folder is first on ``sys.path`` when run as ``python benchmarks/X.py``).
"""

from toyworld.variants import BF16_OF, VARIANT_NAMES, VARIANTS, Variant, composed_text, variant

from .cli import (DEFAULT_BARS, DEFAULT_FIGURE, DEFAULT_JSON, QUICK, main, merge_reports, parse_args,
                  parse_set_options)
from .figures import PLOT_COLOURS, category_bars_figure, quality_vs_time_figure, save_figures
from .runner import (DEFAULT_PER_CATEGORY, DEFAULT_SEEDS, SEED_BASES, _environment, _quiet_loading, _round,
                     _write_json, benchmark_prompts, load_judge_clip, missing_toy_models, prompt_set_name,
                     reference_scores, run_benchmark, start_analysis, variant_options)
from .summary import (CATEGORY_FLOOR, OVERALL_TARGET, check_targets, format_table, format_targets, lifts,
                      overall_interval, summarise, wilson_interval)

__all__ = [
    "Variant", "VARIANTS", "VARIANT_NAMES", "BF16_OF", "variant", "composed_text",
    "DEFAULT_BARS", "DEFAULT_FIGURE", "DEFAULT_JSON", "QUICK", "main", "merge_reports", "parse_args",
    "parse_set_options",
    "PLOT_COLOURS", "category_bars_figure", "quality_vs_time_figure", "save_figures",
    "DEFAULT_PER_CATEGORY", "DEFAULT_SEEDS", "SEED_BASES", "_environment", "_quiet_loading", "_round",
    "_write_json", "benchmark_prompts", "load_judge_clip", "missing_toy_models", "prompt_set_name",
    "reference_scores", "run_benchmark", "start_analysis", "variant_options",
    "CATEGORY_FLOOR", "OVERALL_TARGET", "check_targets", "format_table", "format_targets", "lifts",
    "overall_interval", "summarise", "wilson_interval",
]
