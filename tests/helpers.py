"""Small builders shared by the tests."""

import dataclasses

from mtl.config import HeadConfig, ModelConfig, tiny

HEADS = (HeadConfig("spell", "generate"), HeadConfig("lang", "classify", 5), HeadConfig("echo", "generate"))


def tiny_model_config(**changes) -> ModelConfig:
    return dataclasses.replace(tiny().model, heads=HEADS, **changes)
