"""``torch_perplexity`` (evaluate's scorer: length-sorted batches, LM head only where scored) gives
the same loss and token count as scoring the full logits."""
from __future__ import annotations

import pytest

from ..family_models import CASES, build_model, build_tokenizer


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_torch_perplexity_equals_full_logits_scoring(family):
    from tuneops.inference.chat import tokenize
    from tuneops.inference.scoring import perplexity, torch_forward, torch_perplexity

    tok = build_tokenizer(CASES[family])
    model = build_model(family, tok).eval()
    convs = [[{"role": "user", "content": "Hi there" * k}, {"role": "assistant", "content": "Hello, how are you?"},
              {"role": "user", "content": "Fine"}, {"role": "assistant", "content": "Good " * (5 - k)}]
             for k in range(1, 6)]
    features = [tokenize(c, tok, 128) for c in convs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    full = perplexity(torch_forward(model), features, 2, pad)
    fast = torch_perplexity(model, features, 2, pad)
    assert fast["tokens"] == full["tokens"] > 0
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_distortion_is_zero_for_the_reference_and_grows_with_the_damage():
    import torch

    from tuneops.inference.chat import tokenize
    from tuneops.inference.scoring import torch_distortion, torch_perplexity

    tok = build_tokenizer(CASES["llama3"])
    model = build_model("llama3", tok).eval()
    convs = [[{"role": "user", "content": "Hi there" * k}, {"role": "assistant", "content": "Hello, how are you?"}]
             for k in range(1, 5)]
    features = [tokenize(c, tok, 128) for c in convs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    score = torch_distortion(model, features, 2, pad)
    same = score()
    assert same["perplexity"] == pytest.approx(torch_perplexity(model, features, 2, pad)["perplexity"])
    assert abs(same["kl"]) < 1e-3                         # fp16 reference: rounding only
    weight = model.model.layers[0].mlp.down_proj.weight
    original = weight.detach().clone()
    kls = []
    for noise in (0.02, 0.2):
        with torch.no_grad():
            weight.copy_(original + noise * torch.randn_like(original))
        kls.append(score()["kl"])
    assert 1e-3 < kls[0] < kls[1]
