"""Task heads besides the causal LM: sequence classification (``{text, label}``) and token
classification / NER (``{tokens, tags}``, BIO), for encoders (MiniLM) and for decoders whose
family has the head in transformers (Gemma 3: sequence classification).

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

from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
CAUSAL_LM = "causal_lm"
SEQ_CLS = "sequence_classification"
TOKEN_CLS = "token_classification"
HEADS = (SEQ_CLS, TOKEN_CLS)
FORMAT_OF_HEAD = {SEQ_CLS: "classification", TOKEN_CLS: "ner"}
# evaluate's primary metric per head: (name, direction); register's gate compares it
PRIMARY = {CAUSAL_LM: ("perplexity", "lower"), SEQ_CLS: ("accuracy", "higher"), TOKEN_CLS: ("entity_f1", "higher")}


def head_of(plan: dict[str, Any]) -> str:
    return plan.get("task_head", CAUSAL_LM)


def is_head(plan: dict[str, Any]) -> bool:
    return head_of(plan) in HEADS


def auto_class(head: str) -> Any:
    import transformers

    return {CAUSAL_LM: transformers.AutoModelForCausalLM, SEQ_CLS: transformers.AutoModelForSequenceClassification,
            TOKEN_CLS: transformers.AutoModelForTokenClassification}[head]


def supports(model_type: str, head: str) -> bool:
    """Whether transformers has this head for the model family (e.g. Gemma 3: sequence
    classification yes, token classification no)."""
    from transformers.models.auto import modeling_auto as ma

    names = {CAUSAL_LM: ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             SEQ_CLS: ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             TOKEN_CLS: ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES}[head]
    return model_type in names


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
        raise ValueError(f"the {head} head needs the native {FORMAT_OF_HEAD[head]} record in each validated row "
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
    head = head_of(plan)
    label2id = label_kwargs(plan)["label2id"]
    fn = encode_classification if head == SEQ_CLS else encode_ner
    return [fn(_record(r, head), tokenizer, max_len, label2id) for r in rows]


def label_prefix(plan: dict[str, Any]) -> int:
    """Positions peft prepends to the sequence (prompt tuning's virtual tokens): token labels
    need as many -100s in front, or logits and labels do not line up."""
    from .methods import spec

    if head_of(plan) == TOKEN_CLS and plan.get("method") and spec(plan["method"]).virtual_tokens:
        return int((plan.get("peft") or {}).get("num_virtual_tokens") or 0)
    return 0


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
    labels = list(plan["labels"])
    pred = predict(model, features, batch_size, pad_id)
    if head_of(plan) == SEQ_CLS:
        return classification_metrics([f["labels"] for f in features], pred, labels), [labels[p] for p in pred]
    gold = [[labels[y] for y in f["labels"] if y != IGNORE_INDEX] for f in features]
    names = [[labels[y] for y in p] for p in pred]
    return ner_metrics(gold, names), names
