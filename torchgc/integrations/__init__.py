"""Integrations with other training stacks: transformers (what enabling does to one model),
torch.distributed (FSDP2, DDP) and LLaMA-Factory.

Only this package knows those projects' internals; torchgc.patching and the front door call its
public functions.
"""
