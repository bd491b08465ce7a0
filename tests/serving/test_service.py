"""app.serving.service: the process-wide settings of serving (the request path itself is
tested through HTTP in tests/api/test_predict*.py)."""

from __future__ import annotations

import gc

import pytest

from app.errors import InputError
from app.serving.inputs import parse_json
from app.serving.service import tune_gc_for_serving


def test_serving_gc_tuning_never_turns_the_collector_off():
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0  # what was alive is out of the collector's walks
        assert gc.get_threshold()[0] >= 10_000
        parse_json(b'{"instances": [[1, 2.5]]}')
        with pytest.raises(InputError):
            parse_json(b"{")
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
