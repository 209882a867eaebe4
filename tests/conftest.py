import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property-based tests are derandomized (the same examples on every run) and bounded for CI.
settings.register_profile("torchgc", derandomize=True, database=None, deadline=None, max_examples=60)
settings.load_profile("torchgc")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Test helpers (tiny_models) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
