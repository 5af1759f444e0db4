"""Whether KenLM's lmplz is built, and the skip mark of the tests that run it."""

from __future__ import annotations

import pytest

from data_prep.phrases import PhraseMiningError, find_lmplz


def have_lmplz() -> bool:
    try:
        find_lmplz()
        return True
    except PhraseMiningError:
        return False


needs_lmplz = pytest.mark.skipif(not have_lmplz(), reason="KenLM lmplz not built (run `bash launchers/setup.sh`)")
