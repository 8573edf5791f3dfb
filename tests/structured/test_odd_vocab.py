"""Vocabularies that end inside a 32-token mask word (GPT-2's 50,257 ids): the grammar's
vocabulary is the tokenizer's ids exactly (442 here), whether the LM head has exactly those
rows or more (515, 512). Many sampled constrained outputs (several seeds, temperature 1, on
tiny random models that would never write JSON themselves) all parse and validate, and no
sampled token is ever refused by its grammar."""

from __future__ import annotations

import json
import logging

import jsonschema
import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.sampling_params import StructuredOutputsParams as SO
from tests.structured.schemas import schemas


@pytest.fixture(scope="module", params=["exact", 515, 512])
def odd_llm(request, tiny_model_factory, tmp_path_factory):
    import torch
    import transformers as tf

    from kvserve.loader.tokenizer import Tokenizer
    from tests.conftest import _save_tokenizer, _tiny_config

    folder = tmp_path_factory.mktemp("odd-vocab")
    _save_tokenizer(folder)
    ids = max(Tokenizer.from_folder(folder).backend.get_vocab().values()) + 1
    assert ids % 32
    head = ids if request.param == "exact" else request.param
    cfg = _tiny_config("llama")
    cfg.vocab_size = head
    torch.manual_seed(7)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0 if "emb" in name else 2.0)
    model.save_pretrained(folder)
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=512, max_num_seqs=64)
    assert llm.engine.model_config.vocab_size == head
    return llm, ids


def test_sampled_outputs_validate(odd_llm, caplog):
    llm, ids = odd_llm
    # Bounded outputs only: free-form property names (additionalProperties) can run to max_tokens
    # at temperature 1 on a random model.
    all_schemas = [s for s in schemas() if '"additionalProperties": {' not in json.dumps(s)]
    seeds = range(4)
    params = [SamplingParams(max_tokens=256, temperature=1.0, seed=1000 * k + i, structured_outputs=SO(json=s))
              for k in seeds for i, s in enumerate(all_schemas)]
    prompts = [{"prompt_token_ids": [5, 17, 99, 23, 42, i % 50]} for i in range(len(params))]
    with caplog.at_level(logging.ERROR, logger="kvserve.structured.grammar"):
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]
    assert llm.engine.structured.compiler.vocab_size == ids
    for p, o in zip(params, outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (p.structured_outputs.json, c.text[:80])
        assert all(t < ids for t in c.token_ids)
        try:
            jsonschema.validate(json.loads(c.text), p.structured_outputs.json)
        except (ValueError, jsonschema.ValidationError) as e:
            dv = llm.engine.structured.compiler.info.decoded_vocab
            pytest.fail(f"{e}\ntokens: {[bytes(dv[t]) for t in c.token_ids]}")
