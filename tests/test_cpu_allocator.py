"""CPU runs keep freed tensor memory for the next step instead of faulting fresh pages in for every large tensor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from common.cpu_allocator import keep_freed_cpu_memory
    if sys.argv[1] == "kept":
        assert keep_freed_cpu_memory()
    hidden, decoder = torch.randn(600, 64), torch.randn(25426, 64, requires_grad=True)

    def step():  # the masked-LM head of a training step: [600, 25,426] logits, forward and backward
        torch.nn.functional.log_softmax(hidden @ decoder.T, -1).sum().backward()

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator settings exist on Linux only"
)
def test_large_tensors_reuse_freed_memory_instead_of_faulting_in_new_pages():
    assert _page_faults("kept") * 3 < _page_faults("default")
