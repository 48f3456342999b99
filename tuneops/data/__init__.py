"""Data: the record formats, the bundled scenario datasets, record parsing and the
validation gate (record checks, then a Great Expectations suite per format).

The names below are imported by ``tuneops.config``, so this module stays import-light.
"""
from __future__ import annotations

# Record formats (JSONL, one record a line; CSV/Parquet where natural): see formats.py.
FORMATS = ("chat", "instruction", "text", "classification", "ner", "translation", "qa")

# Bundled scenarios (``data.scenario``) -> the format their dataset is in; ``user`` is a
# dataset added with ``tuneops data add`` (format from ``data.format``).
SCENARIOS = {
    "chat": "chat",                    # chatterbot-corpus conversations
    "qa": "qa",                        # chatterbot-corpus question -> answer pairs (free-text answers)
    "translation": "translation",      # Django's .po catalogs, EN -> ingest.target_language
    "definitions": "qa",               # WordNet: word -> gloss, extractive (answer span in context)
    "topics": "classification",        # WordNet: gloss -> one of 45 lexicographer classes
    "sentiment": "classification",     # VADER lexicon: human-rated valence -> negative/neutral/positive
    "ner": "ner",                      # WordNet glosses, silver BIO tags from a WordNet gazetteer
    "domain": "text",                  # Django docstrings: plain-text domain adaptation
    "creative": "instruction",         # BSD fortune collections: prompt -> quote, riddle
    "user": None,                      # your dataset (tuneops data add PATH --format F)
}
