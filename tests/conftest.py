import pytest

from unhans.core.data import load_digits8, load_mnist5k


@pytest.fixture(scope="session")
def mnist():
    return load_mnist5k()


@pytest.fixture(scope="session")
def digits():
    return load_digits8()
