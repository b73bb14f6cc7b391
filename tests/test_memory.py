"""HeapTrimmer: trims only once resident memory has grown past its slack."""

from __future__ import annotations

import sys

import pytest

from illusion_probe.memory import HeapTrimmer, resident_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc malloc_trim")


@linux_only
def test_resident_bytes_is_positive() -> None:
    assert resident_bytes() > 0


@linux_only
def test_trims_only_past_the_slack() -> None:
    never = HeapTrimmer(slack_bytes=1 << 50)
    always = HeapTrimmer(slack_bytes=-1)
    for _ in range(3):
        never()
        always()
    assert never.trims == 0
    assert always.trims == 3
