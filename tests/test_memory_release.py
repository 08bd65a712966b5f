"""`service.runtime.release_freed_memory`: what a model process runs between loading and warm-up.

Loading frees the eager models the artifacts replace and the linears set that lost the timing; glibc kept that
memory for the life of the process (95 MB in the process that times the linears, docs/benchmarks.md).
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# 100,000 blocks of 1 KB (malloc's heap, not Python's small-object arenas), one in ten kept: the rest is freed
# memory between live blocks, which glibc does not give back by itself.
FRAGMENTED = """
from service.runtime import release_freed_memory
blocks = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]
kept = blocks[::10]
del blocks
print(release_freed_memory(), release_freed_memory())
"""


def test_the_heap_loading_left_free_goes_back_to_the_system() -> None:
    run = subprocess.run([sys.executable, "-c", FRAGMENTED], cwd=ROOT, capture_output=True, text=True, check=True)
    first, second = map(int, run.stdout.split())
    assert first > 40 * 2**20, run.stdout  # ~90 MB freed: most of it returned
    assert second < 4 * 2**20, run.stdout  # and nothing much left the second time
