"""Soak: 1,000 training steps of a tiny Llama with the offload strategy and a new random sequence
length every step (dynamic padding, the usual case). Host memory must stay flat after warm-up:
the pool caches blocks by size class under a cap, so new sizes do not add up step after step."""

import random
import statistics

import torch

import torchgc
from torchgc.bench.measure import rss_bytes
from tiny_models import VOCAB, build

STEPS, WARMUP = 1000, 100
BATCH, LAYERS, HIDDEN = 2, 3, 64
MIN_LEN, MAX_LEN = 16, 512
# Stated tolerances. The pool: at the end of a step nothing is in use, and the cache holds at most
# the peak in use, which is at most the inputs of the longest step (every layer's but the last)
# rounded up to their size classes (a quarter at most). RSS: the median of the last 100 steps
# within 32 MiB of the median of the 100 after warm-up; the old exact-size pool grew about
# 0.16 MiB a step here, 130 MiB over the same span.
LONGEST_STEP_BYTES = (LAYERS - 1) * BATCH * MAX_LEN * HIDDEN * 4
RSS_TOLERANCE = 32 * 2**20


def test_host_memory_stays_flat_with_a_new_sequence_length_every_step():
    torch.manual_seed(0)
    torchgc.ops.empty_host_pool()
    torchgc.ops.set_host_pool_limit(None)
    model = build("llama", layers=LAYERS)
    model.config.use_cache = False
    with torchgc.patched(strategy="offload", min_offload_bytes=0):
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    reserved, rss = [], []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, rng.randint(MIN_LEN, MAX_LEN)))
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        stats = torchgc.ops.host_pool_stats()
        assert stats.in_use_bytes == 0, "offloaded inputs outlived their step"
        reserved.append(stats.reserved_bytes)
        rss.append(rss_bytes())
    assert max(reserved[:WARMUP]) > 0, "nothing was offloaded, so this test would prove nothing"
    assert max(reserved[WARMUP:]) <= 1.25 * LONGEST_STEP_BYTES, (max(reserved[WARMUP:]), LONGEST_STEP_BYTES)
    early, late = statistics.median(rss[WARMUP:WARMUP + 100]), statistics.median(rss[-100:])
    assert late <= early + RSS_TOLERANCE, f"RSS grew from {early / 2**20:.0f} MiB to {late / 2**20:.0f} MiB"
