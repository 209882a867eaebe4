"""Integrations with other training stacks (transformers, accelerate's FSDP2, LLaMA-Factory).

Only torchgc.patch and this package know those projects' internals.
"""
