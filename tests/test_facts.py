"""The factual prompts: well formed for the tokenizer, and answered by smollm2-135m."""

from __future__ import annotations

import pytest
import torch

from circuitkit.data import FACTS
from circuitkit.methods.causal_tracing import find_subject


def test_facts_are_well_formed(tiny_gpt2):
    assert len(FACTS) >= 12
    assert len({fact.prompt for fact in FACTS}) == len(FACTS)
    for fact in FACTS:
        assert fact.prompt.count(fact.subject) == 1, fact
        assert not fact.prompt.endswith(" ") and fact.target.startswith(" "), fact
        assert len(tiny_gpt2.to_tokens(fact.target, prepend_bos=False)[0]) == 1, fact
        tokens = tiny_gpt2.to_tokens(fact.prompt)[0]
        positions = find_subject(tiny_gpt2, tokens, fact.subject)
        # the subject is not the last token: the trace has the last token apart from it
        assert positions[-1] < len(tokens) - 1, fact


@pytest.mark.real
def test_smollm_answers_every_fact(smollm):
    with torch.no_grad():
        for fact in FACTS:
            probs = smollm(smollm.to_tokens(fact.prompt))[0, -1].softmax(-1)
            target = smollm.to_single_token(fact.target)
            assert int(probs.argmax()) == target, fact
            assert float(probs[target]) == pytest.approx(fact.smollm2_prob, abs=0.01), fact
