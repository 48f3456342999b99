"""Model families as data: one ``Family`` per architecture family, read by the planner
(``tuneops/planner/model.py``: module shapes, norms, biases, GQA, tied embeddings), the trainer
(``tuneops/training/methods.py``: LoRA targets checked against the loaded model) and the exporter
(``tasks/optimize.py``, ``tuneops/export/genai.py``: RoPE variant, sliding windows), and by the model stage
(``tuneops/models.py``: the default chat template of a tokenizer that has none, and how the family
writes and parses a tool call: ``tool_format``).

Adding a family is one entry in ``FAMILIES`` (plus its test in ``tests/test_families.py``).

LoRA targets are written with the canonical (Llama) names ``q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj``; ``fused`` maps them to the module that holds them in a family that fuses
projections (Phi-3: ``qkv_proj``, ``gate_up_proj``). ``select.lora.target_modules`` is a list of
such names, ``auto`` (the family's attention projections) or ``all-linear`` (attention + MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CANONICAL_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
CANONICAL_MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = ("auto", "all-linear")

# Gemma 3's own chat template (google/gemma-3-*-it tokenizer_config.json). The bundled Gemma 3 270M
# GGUF carries no chat template; the model stage writes this one into its tokenizer, so Gemma keeps
# its own turn format (system prompt folded into the first user turn, <end_of_turn> ends a turn).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    fused: dict[str, str] = field(default_factory=dict)   # canonical name -> the module holding it
    norms_per_layer: int = 2          # RMSNorms per block (Gemma 2/3: pre and post attention and MLP)
    qk_norm: bool = False             # RMSNorm on queries and keys
    qkv_bias: bool = False            # attention_bias when config.json does not say
    rope: str = "default"             # default | local-global (two bases: sliding / full layers) | longrope
    sliding_window: str = "none"      # none | all (every layer, when config.sliding_window is set) | interleaved
    chat_template: str | None = None  # default for a tokenizer without one (None: tuneops.inference.chat.CHATML)
    tool_format: str | None = None    # how the family's instruct templates write and parse a tool call: a
                                      # tuneops.inference.toolcalls format name. The model stage uses it when the
                                      # model's template carries it (toolcalls.supports), else the template's own
                                      # (toolcalls.detect), else writes tuneops' default syntax into the template
                                      # (toolcalls.with_default_tools: SmolLM2, Gemma 3, Phi-3.5, Qwen2) and
                                      # records the format in the tokenizer (chat.ensure_tool_format)
    encoder: bool = False
    genai_builder: str = "no"         # onnxruntime-genai's model builder (tuneops/export/genai.py), the fused-attention
                                      # exporter: "auto" = optimize.exporter: auto picks it (its graph passes the
                                      # parity gate, tests/test_families.py + the bundled models); "opt-in" = it
                                      # builds the family, on request only (optimize.exporter: builder, genai_*);
                                      # "no" = it fails (Mistral: sliding window ignored, logits off by 8;
                                      # Phi-3 with a longer context than its original: KeyError 'multi_cache')
                                      # or is untested

    # -- planner --------------------------------------------------------------------------------
    def modules(self, h: int, inter: int, q: int, kv: int) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules, ``name -> (d_in, d_out)``, under this family's names."""
        if self.encoder:
            return {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
                    "intermediate.dense": (h, inter), "output.dense": (inter, h)}
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        out: dict[str, tuple[int, int]] = {}
        for name, (d_in, d_out) in shapes.items():
            real = self.fused.get(name, name)
            prev = out.get(real)
            out[real] = (d_in, d_out + (prev[1] if prev else 0))
        return out

    def real_name(self, name: str) -> str:
        return self.fused.get(name, name)

    def preset(self, name: str) -> tuple[str, ...]:
        """Canonical names of ``auto`` (attention projections) or ``all-linear``."""
        if name == "auto":
            return CANONICAL_ATTENTION
        if name == "all-linear":
            return CANONICAL_ATTENTION + CANONICAL_MLP
        raise ValueError(f"select.lora.target_modules: {name!r} is not a list of module names, "
                         f"{' or '.join(TARGET_PRESETS)}")

    def resolve_targets(self, wanted: Any, available: list[str] | tuple[str, ...],
                        strict: bool = True, model: str = "model") -> list[str]:
        """LoRA target names for this family: ``auto``, ``all-linear`` or a list of canonical / real
        names, mapped through ``fused`` and deduplicated; a name the model lacks raises ``ValueError``
        naming the key (or is skipped when not ``strict``)."""
        names = self.preset(wanted) if isinstance(wanted, str) else tuple(wanted)
        out: list[str] = []
        for name in names:
            real = name if name in available else self.real_name(name) if self.real_name(name) in available else None
            if real is None and self.encoder:
                real = _ENCODER_ALIASES.get(name) if _ENCODER_ALIASES.get(name) in available else None
            if real is None:
                if strict:
                    raise ValueError(f"select.lora.target_modules: {model} ({self.name} family) has no module "
                                     f"{name!r} (has {', '.join(available)})")
                continue
            if real not in out:
                out.append(real)
        return out

    # -- exporter -------------------------------------------------------------------------------
    def window(self, config: Any) -> int | None:
        """The attention window the exported model must honour (None: full attention only)."""
        if self.sliding_window == "none":
            return None
        value = getattr(config, "sliding_window", None)
        return int(value) if value else None

    def export_facts(self, config: Any) -> dict[str, Any]:
        return {"family": self.name, "rope": self.rope, "sliding_window": self.sliding_window,
                "window": self.window(config)}


_ENCODER_ALIASES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention.output.dense",
                    "up_proj": "intermediate.dense"}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), genai_builder="auto", tool_format="llama3"),   # Llama 2/3.x, SmolLM2
    Family("mistral", ("mistral",), sliding_window="all", tool_format="mistral"),
    Family("qwen2", ("qwen2",), qkv_bias=True, genai_builder="auto", tool_format="hermes"),   # Qwen2.5
    Family("qwen3", ("qwen3",), qk_norm=True, tool_format="hermes"),
    Family("phi3", ("phi3",), fused={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}, rope="longrope",
           tool_format="phi4-mini"),   # Phi-4-mini (its template takes tools in the system message)
    Family("gemma2", ("gemma2",), norms_per_layer=4, sliding_window="interleaved",
           chat_template=GEMMA3_CHAT_TEMPLATE),
    Family("gemma3", ("gemma3_text", "gemma3"), norms_per_layer=4, qk_norm=True, rope="local-global",
           sliding_window="interleaved", chat_template=GEMMA3_CHAT_TEMPLATE,
           genai_builder="opt-in"),   # Gemma 3 270M: max abs logits diff 5.2e-3 > the 1e-3 gate (perplexity equal)
    Family("bert", ("bert", "roberta"), encoder=True),
)
GENERIC = Family("generic", ())     # any other decoder: Llama module names
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def for_model_type(model_type: str) -> Family:
    return _BY_TYPE.get(model_type, GENERIC)


def for_config(config: Any) -> Family:
    """The family of a transformers config object or a config.json dict."""
    mtype = config.get("model_type", "") if isinstance(config, dict) else getattr(config, "model_type", "")
    return for_model_type(str(mtype))


def _linear_names(model: Any) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear)]


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the ``nn.Linear`` (bitsandbytes 4-bit included) modules of a loaded model."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in _linear_names(model)))


def check_targets(model: Any, targets: list[str] | tuple[str, ...]) -> None:
    """The trainer's check before wrapping: every planned LoRA target names a linear module of the
    loaded model (a plan made for another model fails here with one line, not inside peft)."""
    full = _linear_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        fam = for_config(model.config)
        raise ValueError(f"train: LoRA targets {missing} are not modules of this {fam.name} model "
                         f"(linear modules: {', '.join(linear_module_names(model))}); re-run `tuneops select`")
