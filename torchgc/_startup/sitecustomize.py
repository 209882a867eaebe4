"""Runs at the start of every Python process that a program under `torchgc run` starts: torchrun
and `accelerate launch` workers, LLaMA-Factory relaunching itself under torchrun, and their own
children. `torchgc run` puts this folder first on PYTHONPATH and its options in the TORCHGC_*
variables, so each of those processes patches transformers with the same options.

It imports nothing heavy: torchgc.patch() runs right after the process first imports
transformers.modeling_utils (where PreTrainedModel is), and never in a process that does not.
Then the sitecustomize this one hides, if there is one, runs as it would have.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_WATCHED = "transformers.modeling_utils"


class _PatchWhenTransformersLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _WATCHED:
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def load_then_patch(module):
            load(module)
            _patch()

        spec.loader.exec_module = load_then_patch
        return spec


def _patch() -> None:
    import atexit

    import torchgc

    torchgc.patch()
    report = os.environ.get(torchgc.config.REPORT_VARIABLE)  # torchgc run --report
    if report:
        atexit.register(torchgc.counters.write_report, report)


def _run_hidden_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if _WATCHED in sys.modules:
    _patch()
else:
    sys.meta_path.insert(0, _PatchWhenTransformersLoads())
_run_hidden_sitecustomize()
