"""The real CLIP BPE tokenizer, offline.

OpenAI's CLIP byte-pair vocabulary ships inside the ``open_clip_torch`` package as
``bpe_simple_vocab_16e6.txt.gz``. This module rebuilds the ``vocab.json`` / ``merges.txt``
pair that ``transformers.CLIPTokenizer`` reads from it, so tests and the toy models get the
exact tokenizer of the released CLIP models without a download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

MODEL_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # the slice OpenAI's tokenizer uses


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in CLIP's vocabulary order:
    printable bytes map to themselves and come first, the others follow, shifted past 255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@lru_cache(maxsize=1)
def _merges() -> tuple[str, ...]:
    try:
        source = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
        data = source.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError(
            "the CLIP BPE vocabulary comes from the open_clip_torch package; "
            "install it with `pip install open_clip_torch`"
        ) from err
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return tuple(lines[1 : _NUM_MERGES + 1])


def clip_vocab() -> dict[str, int]:
    """Token -> id, in the order OpenAI's CLIP assigns ids (49408 entries)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in _merges()]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs for ``CLIPTokenizer`` into *folder*."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_merges()) + "\n", encoding="utf-8")
    config = {
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def world_words() -> list[str]:
    """Every word a toy-world caption uses (v2 templates and the v3 grammar), sorted."""
    import re as _re

    from .negatives import OPPOSITE
    from .prompts import COUNT_WORDS, PLURALS
    from .world import COLOURS, SHAPES, TEMPLATES

    text = " ".join(TEMPLATES) + " " + " ".join(OPPOSITE) + " and an on a background"
    words = set(_re.findall(r"[a-z]+", _re.sub(r"\{[a-z]+\}", " ", text)))
    words |= set(COLOURS) | set(SHAPES) | set(PLURALS.values()) | set(COUNT_WORDS.values())
    return sorted(words)


def write_bert_tokenizer(folder: str | Path) -> Path:
    """A word-level ``BertTokenizer`` of the toy world's words (``vocab.txt`` + config) in *folder*:
    BERT's special tokens first, then every world word; anything else is ``[UNK]``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *world_words()]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 40,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
