"""Unit tests build their own settings; in a full run the integration platform's environment (its
config file and tenant tokens, exported for the processes it starts) must not reach them."""

from __future__ import annotations

import sys

import pytest

PLATFORM_ENVIRONMENT = ("OPPEN_CONFIG", "OPPEN_CONFIG_DIR", "OPPEN_TENANT_TOKENS")


@pytest.fixture(autouse=True)
def _without_the_platform_environment(monkeypatch):
    for name in PLATFORM_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    http_common = sys.modules.get("ray_apps.serve.http_common")
    if http_common is not None:  # its users were read from the settings of the environment
        http_common.settings_users.cache_clear()
    yield
    if http_common is not None:
        http_common.settings_users.cache_clear()


@pytest.fixture(scope="session")
def gpt2_tokenizer(mnist_cache):
    """The offline GPT-2 tokenizer, rebuilt once per machine into the test cache."""
    from trainers.tokenizer import load_gpt2_tokenizer

    tokenizer, source = load_gpt2_tokenizer(mnist_cache, offline=True)
    return tokenizer, source
