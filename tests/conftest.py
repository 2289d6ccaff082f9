import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # falqon_testing

# Reproducible tests: every test draws fresh random inputs from its own seeded generator.
@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
