"""The examples in the public docstrings run and print what they say."""
import doctest

import torch

import pytest

import sdalign_rt as sd
from sdalign_rt import adapter, trees


@pytest.mark.parametrize("module,examples", [(sd.ops, 7), (adapter, 1), (trees, 1)])
def test_docstring_examples(module, examples):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= examples and result.failed == 0
