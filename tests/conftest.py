import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property-based tests are derandomized (the same examples on every run) and bounded for CI.
settings.register_profile("torchgc", derandomize=True, database=None, deadline=None, max_examples=60)
settings.load_profile("torchgc")

# Test helpers (tiny_models, patch_helpers, ...) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_patch(monkeypatch):
    """The test starts unpatched, with no TORCHGC_*/FSDP variable set, and ends unpatched (modules
    that patch use it for every test: pytestmark = pytest.mark.usefixtures("clean_patch"))."""
    import torchgc

    for name in list(os.environ):
        if name.startswith("TORCHGC_") or name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
            monkeypatch.delenv(name)
    torchgc.unpatch()
    yield
    torchgc.unpatch()


@pytest.fixture
def checkpoint_calls():
    """One dict per call of torchgc's layer checkpoint during the test (torchgc.checkpoint
    included): the keywords it ran with."""
    from patch_helpers import recording_checkpoint_calls

    with recording_checkpoint_calls() as calls:
        yield calls
