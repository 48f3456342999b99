"""Bundled example datasets, built offline from installed packages (licences in
data/README.md). Each builder returns ``(records, info)``: records in the scenario's
format (extra keys allowed) and the source, licence and counts of what was left out.

* ``chatterbot-corpus`` (PyPI, BSD-3-Clause): chat (chatterbot.py) and question -> answer pairs.
* Django (PyPI, BSD-3-Clause): ``.po`` translation catalogs (read with polib) and docstrings.
* WordNet 3.0 (Debian ``wordnet-base``, WordNet 3.0 licence): glosses, lexicographer
  classes, instance nouns (a gazetteer for silver NER tags).
* VADER lexicon (PyPI ``vaderSentiment``, MIT): human-rated word valence.
* BSD fortune collections (Debian ``fortunes-min``, BSD): quotations and riddles.
* Tool calling (``tool_calls``): conversations calling three functions answered from the sources
  above (WordNet definitions, Django translations, VADER valence), plus chatterbot small talk
  that calls nothing.
"""
from __future__ import annotations

import ast
import inspect
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import chatterbot

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

Records = list[dict[str, Any]]


class SourceMissing(ConfigError):
    """A bundled source is not installed (or params name one that does not exist); the
    message says what to do. The CLI shows it as one ``tuneops: error:`` line."""


# -- chatterbot-corpus -------------------------------------------------------------------------

def chatterbot_qa(language: str) -> tuple[Records, dict[str, Any]]:
    """Each user turn and the assistant reply that follows it, as free-text QA."""
    out: Records = []
    for conv in chatterbot.conversations(language):
        msgs = conv["messages"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            out.append({"question": q["content"], "answer": a["content"], "category": conv["category"]})
    return out, {"source": "chatterbot-corpus 1.3.3", "license": "BSD-3-Clause", "language": language}


# -- Django ----------------------------------------------------------------------------------------

def _django_root() -> Path:
    try:
        import django
    except ImportError:
        raise SourceMissing("the Django package is not installed (pip install 'django>=5.2,<5.3')") from None
    return Path(django.__file__).parent


def django_translation(target: str) -> tuple[Records, dict[str, Any]]:
    """EN -> ``target`` pairs from every Django catalog (django.po, djangojs.po) of that
    locale: translated, non-fuzzy, non-plural entries."""
    import django
    import polib

    root = _django_root()
    catalogs = sorted(root.glob(f"**/locale/{target}/LC_MESSAGES/*.po"))
    if not catalogs:
        have = sorted({p.name for p in (root / "conf" / "locale").iterdir() if p.is_dir()})
        raise SourceMissing(f"ingest.target_language: Django has no locale {target!r} (have: {', '.join(have)})")
    out: Records = []
    skipped = Counter()
    for path in catalogs:
        for e in polib.pofile(str(path)):
            if e.obsolete or "fuzzy" in e.flags:
                skipped["fuzzy_or_obsolete"] += 1
            elif e.msgid_plural:
                skipped["plural"] += 1
            elif not e.msgstr.strip():
                skipped["untranslated"] += 1
            else:
                out.append({"source": e.msgid, "target": e.msgstr, "source_lang": "en", "target_lang": target,
                            "catalog": str(path.relative_to(root.parent))})
    return out, {"source": f"Django {django.__version__} locale catalogs", "license": "BSD-3-Clause",
                 "catalogs": len(catalogs), "skipped": dict(skipped)}


def _chunks(text: str, size: int, skipped: Counter) -> list[str]:
    """Whole prose paragraphs packed into pieces of at most ``size`` characters (a
    longer paragraph stays whole: ingest.max_chars decides); doctest examples are left out."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if ">>>" in para:
            skipped["doctest_paragraphs"] += 1
        elif out and len(out[-1]) + 2 + len(para) <= size:
            out[-1] += "\n\n" + para
        elif para:
            out.append(para)
    return out


def django_docstrings(min_chars: int = 200, chunk_chars: int = 500) -> tuple[Records, dict[str, Any]]:
    """Module, class and function docstrings of Django's own source (a technical
    domain), in chunks of whole paragraphs."""
    import django

    root = _django_root()
    out: Records = []
    skipped: Counter[str] = Counter()
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if not doc:
                    continue
                doc = inspect.cleandoc(doc).strip()
                if len(doc) < min_chars:
                    skipped[f"shorter_than_{min_chars}_chars"] += 1
                    continue
                module = str(path.relative_to(root.parent).with_suffix(""))
                out.extend({"text": chunk, "module": module} for chunk in _chunks(doc, chunk_chars, skipped))
    return out, {"source": f"Django {django.__version__} docstrings", "license": "BSD-3-Clause",
                 "skipped": dict(skipped)}


# -- WordNet ---------------------------------------------------------------------------------------

# lex_filenum -> lexicographer file (WordNet 3.0 lexnames(5WN)): the 45 classes.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
WN_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
ENTITY_TYPES = {"noun.person": "PER", "noun.location": "LOC", "noun.group": "ORG"}   # else MISC


@dataclass
class Synset:
    offset: str
    pos: str
    lexname: str
    words: list[str]
    instance: bool
    definition: str
    examples: list[str]


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
    return definition, [e.strip() for e in examples if e.strip()]


@lru_cache(maxsize=1)
def wordnet() -> tuple[dict[str, Synset], dict[str, dict[str, list[str]]]]:
    """All synsets by ``pos:offset`` and, per POS, lemma -> synset keys in sense order
    (parsed once per process; read-only)."""
    if not (WORDNET_DIR / "data.noun").is_file():
        raise SourceMissing(f"WordNet is not installed at {WORDNET_DIR} (apt-get install wordnet-base)")
    synsets: dict[str, Synset] = {}
    index: dict[str, dict[str, list[str]]] = {}
    for pos, name in WN_FILES.items():
        with (WORDNET_DIR / f"data.{name}").open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition(" | ")
                parts = head.split()
                n_words = int(parts[3], 16)
                words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
                words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]   # adjective markers (a), (p), (ip)
                n_ptr = int(parts[4 + 2 * n_words])
                ptrs = parts[5 + 2 * n_words: 5 + 2 * n_words + 4 * n_ptr]
                definition, examples = _split_gloss(gloss.strip())
                synsets[f"{pos}:{parts[0]}"] = Synset(parts[0], parts[2], LEXNAMES[int(parts[1])], words,
                                                      "@i" in ptrs[0::4], definition, examples)
        lemmas: dict[str, list[str]] = {}
        with (WORDNET_DIR / f"index.{name}").open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                parts = line.split()
                n_synsets, n_ptr = int(parts[2]), int(parts[3])
                offsets = parts[4 + n_ptr + 2:]
                lemmas[parts[0].replace("_", " ")] = [f"{pos}:{o}" for o in offsets[:n_synsets]]
        index[pos] = lemmas
    return synsets, index


_WN_INFO = {"source": "WordNet 3.0 (Debian wordnet-base)", "license": "WordNet 3.0 license (BSD-style)"}


def wordnet_topics() -> tuple[Records, dict[str, Any]]:
    """Gloss -> lexicographer class (45 labels)."""
    synsets, _ = wordnet()
    out = [{"text": f"{', '.join(s.words[:3])}: {s.definition}", "label": s.lexname}
           for s in synsets.values() if s.definition]
    return out, dict(_WN_INFO, labels=len({r["label"] for r in out}))


def wordnet_definitions(max_senses: int = 6) -> tuple[Records, dict[str, Any]]:
    """Extractive QA: the context lists a word's senses (definitions), the question
    quotes a usage example, the answer is the definition of the sense used there."""
    synsets, index = wordnet()
    out: Records = []
    for pos, lemmas in index.items():
        for lemma, keys in lemmas.items():
            if not 2 <= len(keys) <= max_senses or not lemma.isalpha():
                continue
            senses = [synsets[k] for k in keys]
            header = f"{lemma} ({POS_NAMES[pos]}):"
            lines, starts = [header], []
            pos_in = len(header) + 1
            for i, s in enumerate(senses, 1):
                prefix = f"{i}. "
                starts.append(pos_in + len(prefix))
                lines.append(prefix + s.definition)
                pos_in += len(prefix) + len(s.definition) + 1
            context = "\n".join(lines)
            for s, start in zip(senses, starts):
                example = next((e for e in s.examples if re.search(rf"\b{re.escape(lemma)}", e, re.I)), None)
                if example and s.definition:
                    out.append({"context": context,
                                "question": f'Which sense of "{lemma}" is used in: "{example}"?',
                                "answer": s.definition, "answer_start": start, "lexname": s.lexname})
    return out, dict(_WN_INFO)


_TOKEN = re.compile(r"\w+(?:-\w+)*|'s\b|[^\w\s]")


def wordnet_ner(min_name_chars: int = 3) -> tuple[Records, dict[str, Any]]:
    """Silver NER: WordNet glosses and examples, tagged (BIO) by longest match against a
    gazetteer of WordNet instance nouns (PER / LOC / ORG from their lexicographer class,
    MISC otherwise). Only sentences with at least one entity are kept."""
    synsets, index = wordnet()
    gazetteer: dict[tuple[str, ...], str] = {}
    for lemma, keys in index["n"].items():          # sense order: the most frequent sense decides the type
        inst = [synsets[k] for k in keys if synsets[k].instance]
        if not inst:
            continue
        for s in inst:
            for w in s.words:
                if w.lower() == lemma and w[:1].isupper() and len(w) >= min_name_chars:
                    gazetteer.setdefault(tuple(_TOKEN.findall(w)), ENTITY_TYPES.get(inst[0].lexname, "MISC"))
    longest = max(len(k) for k in gazetteer)
    out: Records = []
    seen: set[str] = set()
    for s in synsets.values():
        for sentence in [s.definition, *s.examples]:
            if sentence in seen:
                continue
            seen.add(sentence)
            tokens = _TOKEN.findall(sentence)
            tags = ["O"] * len(tokens)
            i = 0
            while i < len(tokens):
                n = 0
                if tokens[i][:1].isupper():          # names start with a capital
                    n = next((n for n in range(min(longest, len(tokens) - i), 0, -1)
                              if tuple(tokens[i:i + n]) in gazetteer), 0)
                if n:
                    kind = gazetteer[tuple(tokens[i:i + n])]
                    tags[i:i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                    i += n
                else:
                    i += 1
            if any(t != "O" for t in tags):
                first = next(t[2:] for t in tags if t != "O")
                out.append({"tokens": tokens, "tags": tags, "entity_type": first})
    return out, dict(_WN_INFO, labels="silver (gazetteer of WordNet instance nouns)", gazetteer=len(gazetteer))


# -- VADER -------------------------------------------------------------------------------------------

def vader_sentiment() -> tuple[Records, dict[str, Any]]:
    """Words and emoticons with their mean human valence rating (10 raters, -4..+4):
    negative <= -1, positive >= 1, neutral when |mean| < 0.5; 0.5 <= |mean| < 1 is left out."""
    try:
        import vaderSentiment
    except ImportError:
        raise SourceMissing("vaderSentiment is not installed (pip install vaderSentiment==3.3.2)") from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    out: Records = []
    weak = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip():
            continue
        mean = float(parts[1])
        label = "negative" if mean <= -1 else "positive" if mean >= 1 else "neutral" if abs(mean) < 0.5 else None
        if label is None:
            weak += 1
            continue
        out.append({"text": parts[0], "label": label, "valence": mean})
    return out, {"source": "VADER lexicon (vaderSentiment 3.3.2)", "license": "MIT",
                 "skipped": {"weak_valence": weak}}


# -- fortunes ------------------------------------------------------------------------------------------

def fortunes_creative() -> tuple[Records, dict[str, Any]]:
    """Creative generation: a prompt naming the kind of piece (and its author, when the
    quotation is attributed) -> the quotation or riddle."""
    files = {"fortunes": "a short, witty saying", "literature": "a short literary passage",
             "riddles": "a riddle or joke"}
    if not (FORTUNES_DIR / "fortunes").is_file():
        raise SourceMissing(f"fortune collections are not installed at {FORTUNES_DIR} (apt-get install fortunes-min)")
    out: Records = []
    for name, kind in files.items():
        text = (FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            lines = entry.strip("\n%").rstrip().splitlines()
            if not lines:
                continue
            author = None
            if re.match(r"^\s+--\s*\S", lines[-1]):
                author = re.sub(r"^\s+--\s*", "", lines.pop()).strip()
            body = "\n".join(lines).strip()
            if not body:
                continue
            prompt = f"Write {kind}" + (f" in the manner of {author}." if author else ".")
            out.append({"prompt": prompt, "completion": body, "collection": name})
    return out, {"source": "BSD fortune collections (Debian fortunes-min)", "license": "BSD-3-Clause (fortune-mod)"}


# -- tool calling ----------------------------------------------------------------------------------------

def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TRANSLATE_LANGUAGES = {"de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "pl": "Polish"}
TOOLS = [
    _tool("define_word", "Look up the definition of an English word (WordNet)",
          {"word": {"type": "string"}, "pos": {"type": "string", "enum": ["noun", "verb", "adjective", "adverb"]}},
          ["word", "pos"]),
    _tool("translate", "Translate a short English text",
          {"text": {"type": "string"}, "target_language": {"type": "string", "enum": list(TRANSLATE_LANGUAGES)}},
          ["text", "target_language"]),
    _tool("get_sentiment", "Sentiment of an English word: label and valence from -4 to 4 (VADER)",
          {"text": {"type": "string"}}, ["text"]),
]


def _conversation(question: str, name: str, args: dict[str, Any], result: str, answer: str) -> Records:
    import json

    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
            {"role": "assistant", "content": answer}]


_DEFINE_ASKS = ('What does the {pos} "{word}" mean?', 'Define "{word}" ({pos}).', 'Look up the {pos} "{word}".')
_TRANSLATE_ASKS = ('How do you say "{text}" in {language}?', 'Translate "{text}" into {language}.')
_SENTIMENT_ASKS = ('Is "{text}" a positive or a negative word?', 'What is the sentiment of "{text}"?')


def _pick(rows: list[Any], n: int, rng: Any) -> list[Any]:
    return rng.sample(rows, n) if len(rows) > n else list(rows)


def tool_calls(seed: int, per_tool: int, language: str = "english",
               max_result_chars: int = 120) -> tuple[Records, dict[str, Any]]:
    """Tool-calling conversations, ``per_tool`` candidates per function (fixed-seed sample): the user
    asks, the assistant calls the function with the exact arguments (JSON string), the tool answers
    from the source, the assistant replies with it; every row declares all three ``TOOLS``. Plus as
    many small-talk exchanges (chatterbot greetings and conversations) that call nothing. Tool results
    and small-talk replies are at most ``max_result_chars`` (a row stays within 512 tokens with the
    tools declared). Each row names its ``tool`` (``none`` for small talk: the scenario's stratify key)."""
    import json
    import random

    import polib

    rng = random.Random(seed)
    out: Records = []
    skipped: Counter[str] = Counter()

    synsets, index = wordnet()
    words = []
    for pos, lemmas in sorted(index.items()):
        for lemma, keys in sorted(lemmas.items()):
            if not (lemma.isalpha() and lemma.islower() and 3 <= len(lemma) <= 16):
                continue
            if not 0 < len(synsets[keys[0]].definition) <= max_result_chars:
                skipped["define_word_definition_empty_or_longer_than_max_result_chars"] += 1
                continue
            words.append((lemma, pos, synsets[keys[0]].definition))
    for i, (lemma, pos, definition) in enumerate(_pick(words, per_tool, rng)):
        pos_name = POS_NAMES[pos]
        out.append({"messages": _conversation(
            _DEFINE_ASKS[i % len(_DEFINE_ASKS)].format(pos=pos_name, word=lemma), "define_word",
            {"word": lemma, "pos": pos_name}, definition, f'"{lemma}" ({pos_name}): {definition}.'),
            "tools": TOOLS, "tool": "define_word"})

    root = _django_root()
    pairs = []
    for code in sorted(TRANSLATE_LANGUAGES):
        catalog = root / "conf" / "locale" / code / "LC_MESSAGES" / "django.po"
        if not catalog.is_file():
            raise SourceMissing(f"the Django package has no {code} catalog at {catalog}")
        for e in polib.pofile(str(catalog)):
            if e.obsolete or "fuzzy" in e.flags or e.msgid_plural or not e.msgstr.strip():
                continue
            text = e.msgid
            if len(text) > 60 or "\n" in text or placeholders_in(text) or '"' in text or '"' in e.msgstr:
                skipped["translate_not_a_short_plain_string"] += 1
                continue
            pairs.append((text, code, e.msgstr))
    for i, (text, code, target) in enumerate(_pick(pairs, per_tool, rng)):
        name = TRANSLATE_LANGUAGES[code]
        out.append({"messages": _conversation(
            _TRANSLATE_ASKS[i % len(_TRANSLATE_ASKS)].format(text=text, language=name), "translate",
            {"text": text, "target_language": code}, target, f'In {name}: "{target}"'),
            "tools": TOOLS, "tool": "translate"})

    lexicon, _ = vader_sentiment()
    rated = [r for r in lexicon if r["text"].isalpha() and r["text"].islower() and len(r["text"]) >= 3]
    for i, r in enumerate(_pick(rated, per_tool, rng)):
        result = json.dumps({"label": r["label"], "valence": r["valence"]})
        out.append({"messages": _conversation(
            _SENTIMENT_ASKS[i % len(_SENTIMENT_ASKS)].format(text=r["text"]), "get_sentiment", {"text": r["text"]},
            result, f'"{r["text"]}" is {r["label"]} (valence {r["valence"]:+.1f} on a scale from -4 to 4).'),
            "tools": TOOLS, "tool": "get_sentiment"})

    talk = [c["messages"][:2] for c in chatterbot.conversations(language)
            if c["category"] in ("greetings", "conversations", "humor", "emotion")]
    skipped["small_talk_longer_than_max_result_chars"] = sum(len(m[1]["content"]) > max_result_chars for m in talk)
    talk = [m for m in talk if len(m[1]["content"]) <= max_result_chars]
    for msgs in _pick(talk, per_tool, rng):
        out.append({"messages": msgs, "tools": TOOLS, "tool": "none"})
    return out, {"source": "WordNet 3.0, Django locale catalogs, VADER lexicon, chatterbot-corpus 1.3.3",
                 "license": "WordNet 3.0 license, BSD-3-Clause, MIT, BSD-3-Clause",
                 "functions": [t["function"]["name"] for t in TOOLS], "skipped": dict(skipped),
                 "candidates": dict(Counter(r["tool"] for r in out))}


def placeholders_in(text: str) -> bool:
    from .formats import placeholders

    return bool(placeholders(text)) or "%" in text or "{" in text
