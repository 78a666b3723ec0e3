"""Fixtures of the reliability suite (``pytest -m reliability``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tiny_tokenizer import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test-built tokenizer and chat template (context length 8192 tokens)."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama3")
