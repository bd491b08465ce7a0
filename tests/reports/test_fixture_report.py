"""The committed fixture report is never edited by hand: it is regenerated from its export,
and the export from the fixture database, byte for byte (the PNGs are checked by their data
elsewhere: tests/reports/test_report.py).

To change them, change the generator or tests/reports/fixture_jobs.py, then run
    REGENERATE_REPORT_FIXTURE=1 .venv/bin/python -m pytest tests/reports/test_fixture_report.py
which writes both files from the code instead of comparing; review and commit the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.cli import main
from app.reports.export import collect, read_export, to_json

from . import fixture_jobs

FIXTURE = Path(__file__).parent / "fixture"
EXPORT = FIXTURE / "results.export.json"
REPORT = FIXTURE / "results.md"
REGENERATE = os.environ.get("REGENERATE_REPORT_FIXTURE") == "1"
EXPORT_COMMAND = "cnn report --export results.export.json --jobs (fixture) --ablation (fixture)"


def test_the_committed_export_is_what_the_fixture_database_exports(clean_db, session_factory):
    with session_factory() as session:
        ids = fixture_jobs.build(session)
        export = collect(
            session,
            ids,
            exported_at=fixture_jobs.EXPORTED_AT,
            command=EXPORT_COMMAND,
            jobs_file=fixture_jobs.JOBS_FILE,
            sweep_id=fixture_jobs.SWEEP_ID,
            ablation_source=fixture_jobs.ablation_source,
        )
    text = to_json(export)
    if REGENERATE:
        EXPORT.write_text(text)
    assert text == EXPORT.read_text()
    assert read_export(EXPORT)[0] == export


def test_the_committed_report_is_regenerated_from_its_export_byte_for_byte(tmp_path, capsys):
    assert main(["report", "--from", str(EXPORT), "--out", str(tmp_path)]) == 0
    produced = (tmp_path / "results.md").read_text()
    if REGENERATE:
        REPORT.write_text(produced)
    assert produced == REPORT.read_text()
    assert "wrote" in capsys.readouterr().out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs[0] == "results-compare.png" and len(pngs) == 5
    for png in pngs:
        assert f"]({png})" in produced


@pytest.mark.skipif(not REGENERATE, reason="only when regenerating the fixture")
def test_regenerating_leaves_no_other_file():
    assert sorted(p.name for p in FIXTURE.iterdir()) == ["results.export.json", "results.md"]


DOCS = Path(__file__).parents[2] / "docs"
NOT_GENERATED = "> **Not generated from an export"


@pytest.mark.parametrize("report", sorted(DOCS.glob("results*.md")), ids=lambda p: p.name)
def test_every_results_file_in_docs_regenerates_from_its_export_or_says_it_does_not(
    report, tmp_path
):
    export = report.with_name(report.name.removesuffix(".md") + ".export.json")
    text = report.read_text()
    if export.is_file():
        assert main(["report", "--from", str(export), "--out", str(tmp_path)]) == 0
        assert (tmp_path / report.name).read_text() == text
        return
    # docs/results.md's GPU database is lost: the file is a historical record, and says so
    # under its title instead of claiming to be generated.
    title, blank, note = text.split("\n")[:3]
    assert title.startswith("# ") and blank == ""
    assert note.startswith(NOT_GENERATED), f"{report.name} needs an export or a note"
