"""The examples in the public API's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["fastlsm._softmax", "fastlsm._loss", "fastlsm._linear", "fastlsm.torch"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "fastlsm.torch":
        pytest.importorskip("torch")
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failed == 0
