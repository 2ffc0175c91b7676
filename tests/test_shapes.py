"""Parameter shapes derived from model configs (memascend.shapes) match LlamaForCausalLM."""
from __future__ import annotations

import json

import pytest

from memascend.errors import ConfigError
from memascend.shapes import llama_parameter_shapes, load_model_config, parameter_count


def test_llama2_7b_parameter_count():
    assert parameter_count(load_model_config("llama2-7b")) == 6_738_415_616


def test_tiny_shapes_in_module_order():
    shapes = llama_parameter_shapes(load_model_config("llama-tiny"))
    assert len(shapes) == 1 + 4 * 9 + 1 + 1
    assert shapes[0] == ("model.embed_tokens.weight", (4096, 256))
    assert [n.rsplit(".", 2)[-2] for n, _ in shapes[1:10]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "input_layernorm", "post_attention_layernorm"]
    layer0 = dict(shapes[1:10])
    assert layer0["model.layers.0.mlp.gate_proj.weight"] == (688, 256)
    assert layer0["model.layers.0.mlp.down_proj.weight"] == (256, 688)
    assert layer0["model.layers.0.input_layernorm.weight"] == (256,)
    assert shapes[-2] == ("model.norm.weight", (256,))
    assert shapes[-1] == ("lm_head.weight", (4096, 256))


def test_grouped_query_attention_and_tied_embeddings():
    cfg = load_model_config("llama2-70b")
    shapes = dict(llama_parameter_shapes(cfg))
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8 * 128, 8192)
    assert shapes["model.layers.79.self_attn.q_proj.weight"] == (8192, 8192)
    tied = dict(llama_parameter_shapes({**cfg, "tie_word_embeddings": True}))
    assert "lm_head.weight" not in tied
    assert parameter_count(cfg) - parameter_count({**cfg, "tie_word_embeddings": True}) \
        == 32000 * 8192


def test_missing_preset_names_it_and_lists_presets():
    with pytest.raises(ConfigError) as info:
        load_model_config("no-such-model")
    assert "no-such-model" in str(info.value)
    assert "llama2-7b" in str(info.value)


def test_malformed_and_incomplete_configs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_model_config(str(bad))
    with pytest.raises(ConfigError, match="missing.json"):
        load_model_config(str(tmp_path / "missing.json"))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="intermediate_size"):
        llama_parameter_shapes(load_model_config(str(partial)))
