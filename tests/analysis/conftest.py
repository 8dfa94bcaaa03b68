"""Fixtures for the analysis tests; the DB builders live in analysis_builders.py."""

import pytest
from analysis_builders import Built, build_small


@pytest.fixture
def small(tmp_path) -> Built:
    """The hand-computed one-run study inputs (see analysis_builders.build_small)."""
    return build_small(tmp_path)
