"""Fixtures shared by integration tests."""

from __future__ import annotations

import pytest

from gazsi_cluster.model import load_model_spec


@pytest.fixture(scope="session")
def reference_model():
    """sentence-transformers on the CPU, the ground truth for every engine and path."""
    from sentence_transformers import SentenceTransformer

    spec = load_model_spec("all-MiniLM-L6-v2")
    return SentenceTransformer(str(spec.path), device="cpu")
