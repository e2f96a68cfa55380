"""Fixtures of the attack tests."""

import pytest

from bdbench.attacks import AttackWorkshop
from bdbench.store import ArtifactCache


@pytest.fixture(scope="package")
def workshop(tmp_path_factory) -> AttackWorkshop:
    """One attack workshop with a cache, shared by the attack tests, so that its surrogate is trained once."""
    return AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path_factory.mktemp("cache")), dataset_key="digits")
