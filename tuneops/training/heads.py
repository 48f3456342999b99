"""Task heads as specs (``Head``, one entry each in ``HEADS``): the causal LM, sequence
classification (``{text, label}``) and token classification / NER (``{tokens, tags}``, BIO), for
encoders (MiniLM) and for decoders whose family has the head in transformers (Gemma 3: sequence
classification). Every stage reads a head's facts from its spec (data format, label names, auto
class, peft task type, per-token or per-sequence labels, primary metric and direction, how it is
scored, exported and served), never by comparing head names. This module imports nothing of
``methods.py``: a method wraps a head (``methods.py`` reads ``Head.peft_task``), not the reverse.

The plan (``select``) names the head (``plan["task_head"]``) and the label names
(``plan["labels"]``, from the validate report: ``data.labels`` / ``data.entity_types`` or the
ones seen in train). The validated rows carry the native record (``row["record"]``).

* features: classification -> ``input_ids`` + one label id; NER -> word pieces of the
  pre-split tokens with the tag's id on the first sub-token of each word and -100 on the
  other sub-tokens and on special tokens (the usual alignment: one prediction per word).
* metrics: accuracy and macro-F1; token (word) accuracy and entity-level span F1 (exact
  type + boundaries, seqeval-style, BIO; an I- without a matching B- starts an entity).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

IGNORE_INDEX = -100
CAUSAL_LM = "causal_lm"
SEQ_CLS = "sequence_classification"
TOKEN_CLS = "token_classification"


@dataclass(frozen=True)
class Head:
    """One task head: everything a stage needs to know about it, so that no stage compares head
    names. ``generative`` marks the causal LM (every data format as chat prompts, vocabulary
    outputs, perplexity, ONNX variants, served as chat); the others are label heads trained on the
    native record of their ``data_format``, registered as a PyTorch pyfunc and served by
    ``/v1/classify``. A new head is one entry in ``HEADS``."""

    name: str
    auto_class: str                  # transformers auto class, e.g. AutoModelForSequenceClassification
    family_mapping: str              # transformers.models.auto.modeling_auto mapping of the families that have it
    peft_task: str                   # peft TaskType: PEFT methods keep a new head trainable (modules_to_save)
    primary_metric: str              # evaluate's metric, compared by register's promotion gate
    higher_is_better: bool
    per_token: bool                  # labels (and predictions) per token/word, else one per sequence
    generative: bool = False         # the causal LM (see above)
    data_format: str | None = None   # the format whose data trains it by default (select.task_head auto)
    record_fields: tuple[str, ...] = ()   # the native record's fields validate keeps in each clean row
    # (train records, data.labels, data.entity_types) -> the label names, in a fixed order
    label_names: Callable[[list[dict[str, Any]], list[Any] | None, list[str] | None], list[str]] | None = None
    # (record, tokenizer, max_len, label2id) -> {"input_ids", "labels"}
    encode: Callable[[dict[str, Any], Any, int, dict[str, int]], dict[str, Any]] | None = None
    # (features, predicted ids, label names) -> (metrics, predictions as label names)
    score: Callable[[list[dict[str, Any]], list[Any], list[str]], tuple[dict[str, float], list[Any]]] | None = None
    head_modules: tuple[str, ...] = ("classifier", "score", "pooler")   # new modules QLoRA leaves unquantized

    @property
    def direction(self) -> str:
        """``higher`` or ``lower``: how evaluate's metrics.json and the gate spell the direction."""
        return "higher" if self.higher_is_better else "lower"

    def auto(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def supports(self, model_type: str) -> bool:
        """Whether transformers has this head for the model family (e.g. Gemma 3: sequence
        classification yes, token classification no)."""
        from transformers.models.auto import modeling_auto

        return model_type in getattr(modeling_auto, self.family_mapping)


def get(name: str) -> Head:
    """The head spec by name (``ValueError`` naming the known ones)."""
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown task head {name!r} (known: {', '.join(HEADS)})") from None


def for_format(fmt: str) -> Head:
    """The head a data format trains by default: the label head whose ``data_format`` it is, else
    the causal LM."""
    return next((h for h in HEADS.values() if h.data_format == fmt), HEADS[CAUSAL_LM])


def head_of(plan: dict[str, Any]) -> str:
    return plan.get("task_head", CAUSAL_LM)


def of(plan: dict[str, Any]) -> Head:
    """The plan's head spec (a plan without ``task_head`` trains the causal LM)."""
    return get(head_of(plan))


def is_head(plan: dict[str, Any]) -> bool:
    """A label head (classification, NER, ...), not the causal LM."""
    return not of(plan).generative


def auto_class(head: str) -> Any:
    return get(head).auto()


def supports(model_type: str, head: str) -> bool:
    return get(head).supports(model_type)


def label_kwargs(plan: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the plan's head (none for the causal LM)."""
    if not is_head(plan):
        return {}
    labels = list(plan.get("labels") or [])
    if len(labels) < 2:
        raise ValueError(f"train: the {head_of(plan)} head needs at least 2 labels in the plan (got {labels}); "
                         "rerun validate and select")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def load(model_dir: Path, plan: dict[str, Any], **kwargs: Any) -> Any:
    """The plan's auto class from ``model_dir`` with its label maps (a fresh head on a base model)."""
    return auto_class(head_of(plan)).from_pretrained(str(model_dir), **label_kwargs(plan), **kwargs)


# -- features --------------------------------------------------------------------------------------

def _record(row: dict[str, Any], head: str) -> dict[str, Any]:
    rec = row.get("record")
    if not isinstance(rec, dict):
        raise ValueError(f"the {head} head needs the native {get(head).data_format} record in each validated row "
                         "('record' key, written by validate for classification/ner data); "
                         "rerun validate, or set select.task_head=causal_lm")
    return rec


def encode_classification(record: dict[str, Any], tokenizer: Any, max_len: int,
                          label2id: dict[str, int]) -> dict[str, Any]:
    label = str(record["label"])
    if label not in label2id:
        raise ValueError(f"label {label!r} is not one of the head's labels {list(label2id)}")
    enc = tokenizer(record["text"], truncation=True, max_length=max_len)
    return {"input_ids": list(enc["input_ids"]), "labels": label2id[label]}


def encode_ner(record: dict[str, Any], tokenizer: Any, max_len: int, label2id: dict[str, int]) -> dict[str, Any]:
    """Word pieces of the pre-split tokens; each word's tag id on its first sub-token, -100
    elsewhere (continuation pieces, special tokens). Words cut off by ``max_len`` get no label."""
    tags = record["tags"]
    unknown = sorted({t for t in tags if t not in label2id})
    if unknown:
        raise ValueError(f"tags {unknown} are not among the head's labels {list(label2id)}")
    enc = tokenizer(list(record["tokens"]), is_split_into_words=True, truncation=True, max_length=max_len)
    labels, prev = [], None
    for word in enc.word_ids():
        labels.append(IGNORE_INDEX if word is None or word == prev else label2id[tags[word]])
        prev = word
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


def encode(rows: list[dict[str, Any]], tokenizer: Any, max_len: int, plan: dict[str, Any]) -> list[dict[str, Any]]:
    head = of(plan)
    label2id = label_kwargs(plan)["label2id"]
    return [head.encode(_record(r, head.name), tokenizer, max_len, label2id) for r in rows]


class HeadCollator:
    """Right-pads ``input_ids`` (attention mask 0 on padding) and, for token labels, pads them
    with -100 (and prepends ``prefix`` -100s for prompt tuning's virtual tokens); counts the
    real tokens seen (tokens/s)."""

    def __init__(self, pad_token_id: int, prefix: int = 0):
        self.pad = pad_token_id
        self.prefix = prefix
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [self.pad] * (width - len(f["input_ids"])) for f in features])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])
        if isinstance(features[0]["labels"], list):
            pad = IGNORE_INDEX
            labels = torch.tensor([[pad] * self.prefix + f["labels"] + [pad] * (width - len(f["labels"]))
                                   for f in features])
        else:
            labels = torch.tensor([f["labels"] for f in features])
        self.tokens += int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def predict(model: Any, features: list[dict[str, Any]], batch_size: int, pad_id: int) -> list[Any]:
    """Predicted label ids: one per example (classification) or one per labelled word (NER,
    positions with label -100 dropped), in order."""
    import torch

    collate = HeadCollator(pad_id)
    out: list[Any] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(features), batch_size):
            batch = collate(features[i:i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if logits.dim() == 3:      # prompt tuning prepends virtual tokens: keep the real positions
                logits = logits[:, -batch["input_ids"].shape[1]:]
            pred = logits.argmax(-1)
            if pred.dim() == 1:
                out.extend(int(p) for p in pred)
            else:
                for p, lab in zip(pred, batch["labels"]):
                    out.append([int(x) for x, y in zip(p, lab) if int(y) != IGNORE_INDEX])
    return out


# -- metrics ---------------------------------------------------------------------------------------

def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over the labels that occur in gold or predictions)."""
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred)) / max(n, 1)
    f1s = []
    for k in sorted(set(gold) | set(pred)):
        tp = sum(g == k and p == k for g, p in zip(gold, pred))
        fp = sum(g != k and p == k for g, p in zip(gold, pred))
        fn = sum(g == k and p != k for g, p in zip(gold, pred))
        f1s.append(_f1(tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0))
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(len(f1s), 1)}


def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` (end exclusive) in a BIO sequence; an I-X that does not
    continue an X entity starts one (seqeval's default, non-strict mode)."""
    out: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and t == kind
        if kind is not None and not continues:
            out.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = t, i
    return out


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Token (word) accuracy and entity-level precision / recall / F1 (micro, exact spans)."""
    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    tp = fp = fn = 0
    for g, p in zip(gold, pred):
        gs, ps = spans(g), spans(p)
        tp, fp, fn = tp + len(gs & ps), fp + len(ps - gs), fn + len(gs - ps)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"token_accuracy": correct / max(words, 1), "entity_precision": precision, "entity_recall": recall,
            "entity_f1": _f1(precision, recall), "entities": tp + fn}


def score(model: Any, features: list[dict[str, Any]], plan: dict[str, Any], batch_size: int,
          pad_id: int) -> tuple[dict[str, float], list[Any]]:
    """The head's metrics of ``model`` on encoded ``features``, and its predictions (label names)."""
    return of(plan).score(features, predict(model, features, batch_size, pad_id), list(plan["labels"]))


def _score_classification(features: list[dict[str, Any]], pred: list[int],
                          labels: list[str]) -> tuple[dict[str, float], list[str]]:
    return classification_metrics([f["labels"] for f in features], pred, labels), [labels[p] for p in pred]


def _score_ner(features: list[dict[str, Any]], pred: list[list[int]],
               labels: list[str]) -> tuple[dict[str, float], list[list[str]]]:
    gold = [[labels[y] for y in f["labels"] if y != IGNORE_INDEX] for f in features]
    names = [[labels[y] for y in p] for p in pred]
    return ner_metrics(gold, names), names


# -- label names (validate's report) ---------------------------------------------------------------

def _class_names(train: list[dict[str, Any]], labels: list[Any] | None, entity_types: list[str] | None) -> list[str]:
    """``data.labels``, else the sorted labels seen in train."""
    return [str(x) for x in labels] if labels else sorted({str(r["label"]) for r in train})


def _bio_names(train: list[dict[str, Any]], labels: list[Any] | None, entity_types: list[str] | None) -> list[str]:
    """``O`` then ``B-``/``I-`` of each entity type (``data.entity_types``, else the types seen in
    train, sorted)."""
    kinds = list(entity_types) if entity_types else sorted({t[2:] for r in train for t in r["tags"] if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]


# -- the registry: every stage reads a head from here ----------------------------------------------

HEADS: dict[str, Head] = {h.name: h for h in (
    Head(CAUSAL_LM, "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM",
         primary_metric="perplexity", higher_is_better=False, per_token=True, generative=True, head_modules=()),
    Head(SEQ_CLS, "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS",
         primary_metric="accuracy", higher_is_better=True, per_token=False, data_format="classification",
         record_fields=("text", "label"), label_names=_class_names, encode=encode_classification,
         score=_score_classification),
    Head(TOKEN_CLS, "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS",
         primary_metric="entity_f1", higher_is_better=True, per_token=True, data_format="ner",
         record_fields=("tokens", "tags"), label_names=_bio_names, encode=encode_ner, score=_score_ner),
)}
