"""Small builders shared by the tests."""

import dataclasses

from mtl.config import HeadConfig, ModelConfig, tiny

HEADS = (HeadConfig("spell", "generate"), HeadConfig("lang", "classify", 5), HeadConfig("echo", "generate"))
ALL_KINDS = HEADS + (HeadConfig("score", "regress", 0, 2.0, 3.0), HeadConfig("pos", "tag", 4))


def tiny_model_config(**changes) -> ModelConfig:
    return dataclasses.replace(tiny().model, **{"heads": HEADS, **changes})
