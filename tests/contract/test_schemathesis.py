"""Schemathesis against the live app's /openapi.json with an admin key: every operation,
every check, bounded in examples and time. 0 failures is the contract (issue 8).

Reproduce by hand (with a server running and a key in var/admin.key):
    st run http://127.0.0.1:8000/openapi.json -H "Authorization: Bearer $(cat var/admin.key)" \
        --checks all --max-examples 20 --max-time 60 --seed 8
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .live import LiveApi

MAX_EXAMPLES = 20
MAX_TIME_S = 60
SEED = 8
CONFIG = Path(__file__).with_name("schemathesis.toml")


def _st() -> str:
    found = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    if not Path(found).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return found


@pytest.mark.slow
def test_schemathesis_finds_nothing(live_api: LiveApi, tmp_path: Path) -> None:
    command = [
        _st(),
        "--config-file",
        str(CONFIG),
        "run",
        f"{live_api.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {live_api.key}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_TIME_S),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    # In tmp_path: schemathesis keeps a cache folder (.schemathesis/) in its working directory.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=MAX_TIME_S + 120, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    summary = output[output.rfind("SUMMARY") :] if "SUMMARY" in output else output[-3000:]
    print(summary)
    assert result.returncode == 0, output[-12000:] + "\n--- API log ---\n" + live_api.tail()
    operations = re.search(r"Tested: (\d+)", output)
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    # Every operation of the document was tested.
    assert operations and selected and operations.group(1) == selected.group(2), summary
    cases = re.search(r"(\d+) generated", output)
    assert cases and int(cases.group(1)) > 100, summary
