"""Batch evaluation of generated images, used by ``scripts/evaluate.py``.

- :mod:`.pairs`: which image-caption pairs to score: run folders written by ``scripts/generate.py`` (their
  ``run.json`` sidecar: ``prompt`` + ``image``), GenEval's folder layout (``NNNNN/metadata.jsonl`` +
  ``NNNNN/samples/*.png``, as ``generate.py --export geneval`` writes it), a CSV/JSONL file of
  ``image,prompt`` rows, or one caption for every image. The other columns of a pairs file or of GenEval's
  metadata (DrawBench's ``category``, GenEval's ``tag``) stay in the output rows.
- :mod:`.scoring`: CLIP scores in batches; work splits over processes with accelerate
  (``split_between_processes`` + ``gather_object``); only the main process writes.
- :mod:`.report`: the table's columns and groups (summaries can be grouped by any column, ``group_by``),
  statistics, the printed summary, the CSV/JSON tables.
- :mod:`.metrics`: several metrics (CLIP score, reward models, the toy judge), one column each.

Bad inputs (missing or corrupt files, bad rows) become error rows that are listed, never a stop.
"""
