import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # falqon_testing


# Reproducible tests: each test draws fresh random inputs from a seed of its own (its node id;
# crc32 because str hashes change from process to process).
@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on the busy 2-core CI machine OpenMP's spinning threads
    make tiny CPU ops (the benchmarks' smoke tests) tens of times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A CLI run's inputs: a tiny model config file and 24 Alpaca records (cli_inputs)."""
    from workflow_testing import cli_inputs

    return cli_inputs(tmp_path_factory.mktemp("inputs"))
