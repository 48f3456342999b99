"""Preference tuning (DPO and its kin) through TRL's ``DPOTrainer`` (issue 33): what the pair
objectives (``tuneops/training/objectives.py``, ``train.objective: dpo``) run in the train stage
(``loop.py``), how evaluate scores held-out pairs, and the ``preference`` data format's
tokenizer rules.

* **Rows -> one internal form** (:class:`Pair`: prompt messages, one chosen and one rejected
  assistant message, optional tools). Accepted rows:

  - OpenAI DPO: ``{"input": {"messages": [...], "tools": [...]?}, "preferred_output":
    [{"role": "assistant", ...}], "non_preferred_output": [{"role": "assistant", ...}]}``
  - TRL, explicit prompt: ``{"prompt", "chosen", "rejected"}`` as text (the prompt becomes one
    user turn, as the ``instruction`` format does) or as messages;
  - TRL, implicit prompt: ``{"chosen", "rejected"}`` as whole conversations sharing every turn
    but the last.

  The checks name the line, the field and the rule (:class:`tuneops.data.records.Problem`):
  ``one_assistant`` (exactly one assistant message on each side), ``identical`` (chosen must
  differ from rejected), ``prompt_prefix`` (both sides share the prompt: the implicit-prompt
  conversations agree on every turn but the last, and the chat template renders the prompt as
  the same token prefix of both sides), ``max_tokens`` (prompt + reply within the budget with the
  model's tokenizer), plus the usual ``required`` / ``type`` / ``enum`` / ``non_empty``.

* **Features from the chat layer** (:func:`features`): the prompt, chosen and rejected token ids
  come from ``tuneops.inference.chat`` (the model's template; the reply plus its end-of-turn marker carries
  the loss, exactly as in SFT), and are handed to TRL already tokenized (TRL 1.16 would otherwise
  re-render with its own rules: an extra EOS after the marker for text rows, the newline after
  the marker labelled for message rows).

* **The reference model, explicit** (:func:`build_models`): ``start`` (the model this run starts
  from: the base, or an SFT model given as a LoRA adapter), ``base``, or ``precomputed`` (the start
  model's log-probs computed once before training, then no reference in memory). The returned
  record says what the reference is and how it was built. The classic SFT-then-DPO bug (TRL
  disables the adapter to get the reference, and a new adapter on top of an SFT adapter then
  compares with the base) cannot happen here: with ``adapter="new"`` the SFT adapter is merged
  into the weights first, so "adapter disabled" is the SFT model; with ``adapter="continue"`` the
  SFT adapter itself is trained and TRL keeps a frozen copy of it as the ``ref`` adapter.

* **Bundled pairs**: ``preference_pairs`` of the data layer's chatterbot module (the ``preference`` scenario).
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tuneops.data.records import Problem

from .objectives import LOSS_TYPES, REFERENCES  # noqa: F401  (the one definition; re-exported)

ROLES = ("system", "user", "assistant", "tool")
Issue = tuple[str, str, str]
Messages = list[dict[str, Any]]


@dataclass
class Pair:
    """One preference: the prompt conversation, the preferred and the other assistant reply."""
    prompt: Messages
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    source: str = "openai"           # openai | trl_messages | trl_implicit | trl_text
    line: int = 0

    def conversation(self, side: str) -> Messages:
        return [*self.prompt, self.chosen if side == "chosen" else self.rejected]

    def to_openai(self) -> dict[str, Any]:
        inp: dict[str, Any] = {"messages": self.prompt}
        if self.tools:
            inp["tools"] = self.tools
        return {"input": inp, "preferred_output": [self.chosen], "non_preferred_output": [self.rejected]}


# -- record checks: the one definition is the ``preference`` data format ---------------------------

def parse(obj: Any, line: int = 0) -> tuple[Pair | None, list[Issue]]:
    """One row (OpenAI DPO or TRL) as a :class:`Pair`, or the issues ``(field, rule, message)``:
    the ``preference`` format's checks (``tuneops.data.formats.preference_parts``: each side is
    checked as a chat record), the same for the data gate, ``tuneops data add``, ingest and the
    jobs API."""
    from tuneops.data import formats

    if not isinstance(obj, dict):
        return None, [("(record)", "type", f"expected a JSON object, got {type(obj).__name__}")]
    out: list[Issue] = []
    parts = formats.preference_parts(obj, out)
    if parts is None:
        return None, out
    keep = ("role", "content", "name", "tool_calls", "tool_call_id")
    clean = lambda m: {k: v for k, v in m.items() if k in keep and v is not None} | (  # noqa: E731
        {"content": m.get("content") or ""} if m.get("role") == "assistant" else {})
    return Pair([clean(m) for m in parts["prompt"]], clean(parts["chosen"]), clean(parts["rejected"]),
                parts["tools"], parts["source"], line), []


def _norm(m: dict[str, Any]) -> str:
    return json.dumps([m.get("content", "").strip(), m.get("tool_calls")], sort_keys=True, default=str)


def check(rows: Iterable[tuple[int, Any]], path: str, tokenizer: Any = None,
          max_len: int | None = None) -> tuple[list[Pair], list[Problem]]:
    """Parse and check ``(line, object)`` rows; with a tokenizer also the token-level rules
    (``prompt_prefix``: the template renders the prompt as the same prefix of both sides;
    ``max_tokens``). Returns the valid pairs and every problem (path, line, field, rule)."""
    pairs: list[Pair] = []
    problems: list[Problem] = []
    for line, obj in rows:
        if isinstance(obj, _BadJson):
            problems.append(Problem(path, line, "(record)", "json", f"not valid JSON: {obj}"))
            continue
        pair, issues = parse(obj, line)
        if pair is not None and tokenizer is not None:
            try:
                encode(pair, tokenizer, max_len)
            except PairError as exc:
                issues = [(exc.field, exc.rule, exc.message)]
                pair = None
        problems += [Problem(path, line, f, rule, msg) for f, rule, msg in issues]
        if pair is not None:
            pairs.append(pair)
    return pairs, problems


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line, object)`` per non-blank line; an unparsable line becomes ``(line, _BadJson)``."""
    out: list[tuple[int, Any]] = []
    for i, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if raw.strip():
            try:
                out.append((i, json.loads(raw)))
            except json.JSONDecodeError as exc:
                out.append((i, _BadJson(str(exc))))
    return out


class _BadJson(str):
    pass


# -- features through the chat layer --------------------------------------------------------------

class PairError(ValueError):
    def __init__(self, field: str, rule: str, message: str):
        super().__init__(f"{field}: {rule}: {message}")
        self.field, self.rule, self.message = field, rule, message


def _side_ids(pair: Pair, side: str, tokenizer: Any) -> tuple[list[int], int, int]:
    """Token ids of prompt + one reply rendered by the chat layer, the index of the first
    labelled token and one past the last (the reply and its end-of-turn marker)."""
    from tuneops.inference import chat

    msgs = [dict(m, weight=0) if m["role"] == "assistant" else m for m in pair.prompt]
    msgs.append(pair.chosen if side == "chosen" else pair.rejected)
    if pair.tools:          # the chat layer renders without tools; the template gets them here
        return _side_ids_with_tools(msgs, pair.tools, tokenizer)
    enc = chat.tokenize(msgs, tokenizer, max_len=10**9)
    labelled = [i for i, lab in enumerate(enc["labels"]) if lab != chat.IGNORE_INDEX]
    if not labelled:
        raise PairError(f"{side}", "labels", "the chat template leaves no token of this reply to train on")
    return enc["input_ids"], labelled[0], labelled[-1] + 1


def _side_ids_with_tools(msgs: Messages, tools: list[dict[str, Any]], tokenizer: Any) -> tuple[list[int], int, int]:
    import os

    from tuneops.inference import chat

    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    text = tokenizer.apply_chat_template(plain, tools=tools, tokenize=False)
    prompt = tokenizer.apply_chat_template(plain[:-1], tools=tools, tokenize=False, add_generation_prompt=True)
    lo = len(os.path.commonprefix([prompt, text]))
    content = plain[-1].get("content") or ""
    start = text.find(content.strip(), lo) if content.strip() else lo
    if start < 0:
        raise PairError("input.tools", "labels", "the chat template does not render the reply verbatim with tools")
    marker = chat.end_marker(tokenizer)
    stop = start + len(content.strip())
    if marker and text.startswith(marker, stop):
        stop += len(marker)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    lab = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < stop and b > start]
    return list(enc["input_ids"]), lab[0], lab[-1] + 1


def encode(pair: Pair, tokenizer: Any, max_len: int | None = None) -> dict[str, list[int]]:
    """``prompt_ids`` (shared), ``chosen_ids`` and ``rejected_ids`` (each reply with its end-of-turn
    marker), as TRL's ``DataCollatorForPreference`` takes them. Raises :class:`PairError`
    (``prompt_prefix``, ``max_tokens``) naming the field."""
    c_ids, c_lo, c_hi = _side_ids(pair, "chosen", tokenizer)
    r_ids, r_lo, r_hi = _side_ids(pair, "rejected", tokenizer)
    p = min(c_lo, r_lo)
    if c_ids[:p] != r_ids[:p]:
        raise PairError("(record)", "prompt_prefix", "the chat template renders the prompt differently before the "
                                                     "chosen and the rejected reply")
    names = ("preferred_output", "non_preferred_output") if pair.source == "openai" else ("chosen", "rejected")
    if max_len is not None:
        for name, hi in zip(names, (c_hi, r_hi)):
            if hi > max_len:
                raise PairError(name, "max_tokens", f"prompt + this reply are {hi} tokens with the model's "
                                                    f"tokenizer, over the limit of {max_len} (model.max_seq_len)")
    return {"prompt_ids": c_ids[:p], "chosen_ids": c_ids[p:c_hi], "rejected_ids": r_ids[p:r_hi]}


def token_issues(row: dict[str, Any], tokenizer: Any, max_len: int) -> list[Issue]:
    """The ``preference`` format's rules that need the model's tokenizer (the data gate runs them):
    the chat template renders the prompt as the same prefix of both sides (``prompt_prefix``),
    prompt + each reply fit ``model.max_seq_len`` (``max_tokens``)."""
    pair, issues = parse(row)
    if pair is None:
        return issues
    try:
        encode(pair, tokenizer, max_len)
    except PairError as exc:
        return [(exc.field, exc.rule, exc.message)]
    return []


def features(pairs: list[Pair], tokenizer: Any, max_len: int | None = None) -> list[dict[str, list[int]]]:
    return [encode(p, tokenizer, max_len) for p in pairs]


def pair_features(path: Path, tokenizer: Any, max_len: int) -> list[dict[str, list[int]]]:
    """Validated preference rows (clean JSONL: each line's ``pair`` in OpenAI's DPO form) as the
    chat layer's prompt / chosen / rejected ids."""
    pairs = []
    for i, row in enumerate(_read_clean(path), 1):
        pair, issues = parse(row.get("pair"), i)
        if pair is None:
            raise ValueError(f"{path}:{i}: not a validated preference row ({issues[:1]}); rerun validate")
        pairs.append(pair)
    return features(pairs, tokenizer, max_len)


def _read_clean(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- reference model ----------------------------------------------------------------------------------

@dataclass
class PreferenceModels:
    """The policy to train, the reference TRL must use (``None``: TRL's own way, stated in
    ``record``), whether its log-probs are precomputed, and the record of the choice."""
    policy: Any
    ref_model: Any
    precompute: bool
    record: dict[str, Any] = field(default_factory=dict)
    peft_config: Any = None      # a new adapter TRL adds itself (so its reference is "adapter disabled")


def _frozen(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_models(load_base: Callable[[], Any], *, peft_config: Any = None, start_adapter: Path | str | None = None,
                 reference: str = "start", adapter: str = "new",
                 prepare: Callable[[Any], Any] | None = None) -> PreferenceModels:
    """Policy and reference, chosen explicitly.

    ``load_base()`` returns a fresh base model (the method's loader: fp32, or 4-bit for QLoRA);
    ``start_adapter`` is an SFT LoRA adapter folder the run starts from (None: the base);
    ``peft_config`` the adapter to train (None: full fine-tuning; a callable: made from the loaded
    policy); ``reference``: ``start`` |
    ``base`` | ``precomputed`` (the start model's log-probs, computed once before training);
    ``adapter`` (with a start adapter and a peft config): ``new`` merges the SFT adapter into the
    weights and trains a fresh adapter on top, ``continue`` trains the SFT adapter itself (TRL keeps
    a frozen copy of it as the ``ref`` adapter; what a 4-bit base needs, since merging into NF4
    weights rounds). ``prepare`` runs on the loaded model before the adapter (QLoRA's kbit
    preparation)."""
    if reference not in REFERENCES:
        raise ValueError(f"train.reference: {reference!r} is not one of {', '.join(REFERENCES)}")
    if adapter not in ("new", "continue"):
        raise ValueError(f"train.adapter: {adapter!r} is not one of new, continue")
    from peft import PeftModel

    start = "base" if start_adapter is None else str(start_adapter)
    new_adapter = None
    record: dict[str, Any] = {"reference": reference, "start": start, "adapter": adapter if start_adapter else "new",
                              "objective": "dpo"}
    policy = load_base()
    if callable(peft_config):      # the method's config from the loaded model (its module names)
        peft_config = peft_config(policy)
    if start_adapter is not None:
        if peft_config is not None and adapter == "continue":
            if prepare is not None:
                policy = prepare(policy)
            policy = PeftModel.from_pretrained(policy, str(start_adapter), is_trainable=True)
            record["construction"] = "the start (SFT) adapter is trained further; TRL keeps a frozen copy of it " \
                                     "as the 'ref' adapter"
        else:
            policy = PeftModel.from_pretrained(policy, str(start_adapter)).merge_and_unload()
            record["construction"] = "the start (SFT) adapter merged into the base weights"
    else:
        record["construction"] = "the base model"
    if not (start_adapter is not None and peft_config is not None and adapter == "continue"):
        if prepare is not None:
            policy = prepare(policy)
        if peft_config is not None:
            # TRL wraps it: handed a PeftModel without peft_config, TRL 1.16 would add a 'ref' copy of the
            # fresh adapter and run it on every reference pass (the same numbers, slower)
            new_adapter = peft_config
            record["construction"] += "; a new adapter on top"
    ref_model: Any = None
    ref_is_start_copy = False
    if reference == "base" and start_adapter is not None:
        ref_model = _frozen(load_base())
        record["reference_model"] = "a separate frozen copy of the base model"
    elif peft_config is not None:
        record["reference_model"] = ("the policy with its 'ref' adapter (a frozen copy of the start adapter)"
                                     if start_adapter is not None and adapter == "continue"
                                     else "the policy with its adapter disabled = the start model")
    else:                    # full fine-tuning: a frozen copy of the start model, made before any step
        ref_model = _frozen(copy.deepcopy(policy))
        ref_is_start_copy = True
        record["reference_model"] = "a frozen copy of the start model"
    precompute = reference == "precomputed"
    if precompute:
        record["reference_model"] = "log-probs of " + record["reference_model"] + \
            ", computed once before training (the reference is not kept in memory)"
        if ref_is_start_copy:
            ref_model = None         # TRL precomputes with the policy itself before the first step
    return PreferenceModels(policy, ref_model, precompute, record, new_adapter)


# -- training ------------------------------------------------------------------------------------------

def _trainer_class() -> Any:
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed the chat layer's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``
        (TRL 1.16 always re-tokenizes; this skips that for rows that are already ids)."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def dpo_config(output_dir: Path | str, *, beta: float = 0.1, loss_type: str | list[str] = "sigmoid",
               **kw: Any) -> Any:
    """TRL's DPOConfig with tuneops' defaults (CPU-friendly fp32, no checkpointing, no reporting);
    ``beta`` and ``loss_type`` checked here with the field named."""
    import torch
    from trl import DPOConfig

    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"train.beta: must be a number > 0 (got {beta!r})")
    for lt in [loss_type] if isinstance(loss_type, str) else loss_type:
        if lt not in LOSS_TYPES:
            raise ValueError(f"train.loss_type: {lt!r} is not one of {', '.join(LOSS_TYPES)}")
    gpu = torch.cuda.is_available()
    defaults = dict(report_to="none", use_cpu=not gpu, bf16=False, gradient_checkpointing=False,
                    save_strategy="no", logging_steps=1, dataloader_pin_memory=False, disable_tqdm=True,
                    remove_unused_columns=False)
    return DPOConfig(output_dir=str(output_dir), beta=float(beta), loss_type=loss_type, **{**defaults, **kw})


def trainer(models: PreferenceModels, feats: list[dict[str, list[int]]], tokenizer: Any, args: Any,
            eval_feats: list[dict[str, list[int]]] | None = None, callbacks: list[Any] | None = None) -> Any:
    """A DPO trainer over chat-layer features with the reference of ``models``. A 4-bit base gets
    the bitsandbytes CPU repack turned off on every Linear4bit (else LoRA silently stops learning
    after the first no-grad forward: the reference pass)."""
    from datasets import Dataset

    from .methods import disable_cpu_bf16_repack

    args.precompute_ref_log_probs = models.precompute
    # before the trainer: with precomputed log-probs TRL runs the reference (no-grad) forward in __init__
    disable_cpu_bf16_repack(models.policy)
    if models.ref_model is not None:
        disable_cpu_bf16_repack(models.ref_model)
    t = _trainer_class()(model=models.policy, ref_model=models.ref_model, args=args,
                         train_dataset=Dataset.from_list(feats),
                         eval_dataset=Dataset.from_list(eval_feats) if eval_feats else None,
                         processing_class=tokenizer, callbacks=callbacks, peft_config=models.peft_config)
    disable_cpu_bf16_repack(t.model)
    return t


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected")


def scores(t: Any, feats: list[dict[str, list[int]]]) -> dict[str, float]:
    """Held-out preference metrics from the trainer's own loss: ``loss``, ``accuracy`` (share of
    pairs with a positive implicit reward margin), ``margin`` (mean), mean chosen / rejected reward."""
    from datasets import Dataset

    m = t.evaluate(eval_dataset=Dataset.from_list(feats))
    return {"loss": m["eval_loss"], "accuracy": m["eval_rewards/accuracies"], "margin": m["eval_rewards/margins"],
            "reward_chosen": m["eval_rewards/chosen"], "reward_rejected": m["eval_rewards/rejected"]}


# -- held-out evaluation ---------------------------------------------------------------------------------

def side_logps(model: Any, feats: list[dict[str, list[int]]], side: str, batch_size: int,
               pad_id: int) -> tuple[list[float], list[int]]:
    """Sum of the log-probs of each pair's ``side`` reply tokens (the chat layer's labelled tokens:
    reply + end-of-turn marker) given its prompt, and the number of those tokens."""
    import torch

    sums: list[float] = []
    counts: list[int] = []
    model.eval()
    for i in range(0, len(feats), batch_size):
        chunk = feats[i:i + batch_size]
        seqs = [f["prompt_ids"] + f[f"{side}_ids"] for f in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for j, (f, s) in enumerate(zip(chunk, seqs)):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
            labels[j, len(f["prompt_ids"]):len(s)] = torch.tensor(s[len(f["prompt_ids"]):])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lab = labels[:, 1:]
        valid = lab != -100
        tok = (logits.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)) * valid
        sums += tok.sum(-1).tolist()
        counts += valid.sum(-1).tolist()
        del logits
    return sums, counts


def pair_scores(model: Any, reference: dict[str, list[float]] | None, feats: list[dict[str, list[int]]],
                beta: float, batch_size: int, pad_id: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Held-out preference metrics of ``model`` against the reference's log-probs (None: the model
    is its own reference, as the start model is at step 0: every margin is 0):

    * ``preference_accuracy``: share of pairs with a positive implicit reward margin
      beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))), as
      TRL's ``rewards/accuracies`` (a tie is not a win);
    * ``margin``: the mean margin; ``reward_chosen`` / ``reward_rejected``: mean rewards;
    * ``logp_accuracy``: share of pairs whose chosen reply has the higher log-prob (no reference);
    * ``chosen_loss`` / ``chosen_perplexity``: per token, on the chosen replies.
    Returns the metrics and the per-pair log-probs (``chosen``, ``rejected``)."""
    import math

    c, nc = side_logps(model, feats, "chosen", batch_size, pad_id)
    r, _ = side_logps(model, feats, "rejected", batch_size, pad_id)
    ref = reference or {"chosen": c, "rejected": r}
    rc = [beta * (a - b) for a, b in zip(c, ref["chosen"])]
    rr = [beta * (a - b) for a, b in zip(r, ref["rejected"])]
    margins = [a - b for a, b in zip(rc, rr)]
    n = max(len(feats), 1)
    loss = -sum(c) / max(sum(nc), 1)
    return {"preference_accuracy": sum(m > 0 for m in margins) / n, "margin": sum(margins) / n,
            "reward_chosen": sum(rc) / n, "reward_rejected": sum(rr) / n,
            "logp_accuracy": sum(a > b for a, b in zip(c, r)) / n,
            "chosen_loss": loss, "chosen_perplexity": math.exp(min(loss, 50.0))}, \
        {"chosen": c, "rejected": r, "margins": margins}
