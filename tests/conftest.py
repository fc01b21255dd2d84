import numpy as np
import pytest


@pytest.fixture
def rng():
    """A generator with a fixed seed, fresh for every test, so failures reproduce."""
    return np.random.default_rng(20240607)
