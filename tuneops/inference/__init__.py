"""The inference side: one engine that every entry point uses (``tuneops generate``, ``tuneops
serve``, the jobs API's model endpoints, the registered pyfunc, evaluate's generations).

- ``chat``: the chat format (each model's own template), training labels and stop tokens;
- ``toolcalls``: tool-call formats of real chat templates (render, parse; not wired in yet);
- ``runtimes``: what runs a model one step at a time (ONNX Runtime graphs, including an
  onnxruntime-genai builder folder, and PyTorch), and the ONNX classifier;
- ``sampling``: greedy / temperature / top-k / top-p, seeded;
- ``decode``: THE decode loop (prefill, then one token per step with the KV cache; batched,
  left-padded, per-row stop tokens and limits), used by ``tuneops generate``, ``tuneops serve``,
  the jobs API, the registered pyfunc, evaluate's generations and the benchmarks;
- ``engine``: ``ChatEngine`` (a chat reply, streamed; stop strings) and ``Classifier``;
- ``resolve``: a folder, a registry URI or a job's model -> one model's files (``ModelFiles.load``);
- ``layout``: the registered model's artifact layout (``onnx_<variant>``, ``tokenizer``);
- ``scheduler``: the bounded queue (slots, cancellation); ``pool``: loaded models, LRU;
- ``http``: the OpenAI-compatible HTTP layer (routes, request schema, errors, auth, the server
  process) and the ``tuneops serve`` app; the jobs API (``tuneops.service``) mounts its routes;
- ``scoring``: perplexity / NLL of any forward function (train, evaluate, optimize, gate);
- ``graders``: OpenAI grader JSON (``evaluate.graders``): string_check, text_similarity, tool_call, scored
  on greedy replies to the eval split's graded turns (evaluate, the champion gate);
- ``finetuned``: the fine-tuned model in PyTorch (base + adapter, or merged);
- ``pyfunc``: the registered MLflow pyfuncs;
- ``commands``: ``tuneops generate`` / ``tuneops classify``.

This file imports nothing: the registered pyfunc imports the package in a fresh environment
(no torch), and each module loads only what it needs.
"""
