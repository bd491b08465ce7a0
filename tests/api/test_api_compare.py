"""GET /compare, /compare.png and /report, and `cnn report`, over HTTP on PostgreSQL.

The jobs are written through the ORM with hand-made curves, so every number the report
states can be checked against the rows it was generated from.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from app.models import EpochMetric, Evaluation
from app.schemas import JobCreate

# net -> (val_loss per epoch, accuracy per epoch, val_accuracy per epoch, test accuracy)
CURVES = {
    "net1": ([1.2, 1.0, 0.9, 0.95, 1.1], [0.4, 0.55, 0.65, 0.75, 0.85], [0.4, 0.5, 0.6, 0.6, 0.59], 0.61),
    "net2": ([1.3, 1.1, 1.2, 1.4, 1.6], [0.35, 0.5, 0.7, 0.85, 0.95], [0.35, 0.45, 0.5, 0.5, 0.49], 0.55),
    "net3": ([1.5, 1.2, 1.0, 0.9, 0.8], [0.3, 0.45, 0.55, 0.62, 0.68], [0.35, 0.5, 0.6, 0.65, 0.7], 0.72),
    "net4": ([1.0, 0.8, 0.7, 0.6, 0.55], [0.5, 0.65, 0.75, 0.82, 0.88], [0.55, 0.7, 0.8, 0.85, 0.88], 0.89),
}  # fmt: skip


@pytest.fixture
def finished(make_job, session_factory):
    """Four succeeded jobs (NET I-IV), five epochs each, with evaluations; returns their ids."""
    ids = {}
    for net, (val_loss, acc, val_acc, test_acc) in CURVES.items():
        extra = {"augment_flip": True, "optimizer": "adamw"} if net == "net4" else {}
        job = make_job("succeeded", net=net, epochs=5, precision="float32", **extra)
        with session_factory() as session:
            session.add_all(
                EpochMetric(
                    job_id=job.id,
                    epoch=i + 1,
                    loss=2.0 / (i + 1),
                    accuracy=acc[i],
                    val_loss=val_loss[i],
                    val_accuracy=val_acc[i],
                    seconds=60.0,
                    learning_rate=0.001,
                )
                for i in range(5)
            )
            session.add(
                Evaluation(
                    job_id=job.id,
                    test_loss=1.0 - test_acc,
                    test_accuracy=test_acc,
                    first_image={},
                    per_class_accuracy=[test_acc] * 10,
                    confusion_matrix=[[0] * 10] * 10,
                )
            )
            session.commit()
        ids[net] = str(job.id)
    return ids


def test_compare_gives_one_row_per_job_in_order(client, finished):
    order = [finished["net2"], finished["net1"]]
    response = client.get("/compare", params={"jobs": ",".join(order)})
    assert response.status_code == 200, response.text
    rows = response.json()["jobs"]
    assert [r["id"] for r in rows] == order
    net1 = rows[1]
    assert set(net1) >= {
        "id", "net", "model_name", "parameters", "macs", "epochs", "precision", "device",
        "training_seconds", "test_loss", "test_accuracy", "best_epoch",
        "overfitting_after_epoch", "final_gap", "max_gap", "history",
    }  # fmt: skip
    assert net1["parameters"] == 193_034 and net1["macs"] > 0
    assert net1["epochs"] == 5 and net1["training_seconds"] == pytest.approx(300.0)
    assert net1["precision"] == "float32" and net1["device"] == "CPU"
    assert net1["test_accuracy"] == pytest.approx(0.61)
    assert net1["best_epoch"] == 3 and net1["overfitting_after_epoch"] == 3
    assert net1["final_gap"] == pytest.approx(0.85 - 0.59)
    assert net1["max_gap"] == pytest.approx(0.85 - 0.59)
    assert net1["history"]["val_loss"] == CURVES["net1"][0]
    assert net1["history"]["epoch"] == [1, 2, 3, 4, 5]


def test_compare_errors(client, finished, expect_error):
    expect_error(client.get("/compare", params={"jobs": ""}), 422, "invalid_job_ids")
    expect_error(client.get("/compare", params={"jobs": "nope"}), 422, "invalid_job_ids")
    missing = str(uuid.uuid4())
    expect_error(client.get("/compare", params={"jobs": missing}), 404, "job_not_found")
    too_many = ",".join(str(uuid.uuid4()) for _ in range(21))
    expect_error(client.get("/compare", params={"jobs": too_many}), 422, "invalid_job_ids")


def test_compare_png_is_an_image(client, finished):
    response = client.get("/compare.png", params={"jobs": ",".join(finished.values())})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")


def test_report_states_the_measured_numbers(client, finished):
    jobs = ",".join(finished[n] for n in ("net1", "net2", "net3", "net4"))
    response = client.get("/report", params={"jobs": jobs})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/markdown")
    text = response.text
    assert f"by `GET /report?jobs={jobs}` from the jobs in the service's database" in text
    assert "| job | net | parameters | MACs/image |" in text
    assert f"/compare.png?jobs={jobs}" in text
    assert f"/jobs/{finished['net1']}/history.png" in text
    # Exercise 10: NET I's val_loss is lowest at epoch 3, then rises while loss falls.
    assert "the validation loss was lowest at epoch 3 of 5 (0.900) and ended 0.200 above" in text
    assert "Overfitting starts after epoch 3" in text
    # NET III trains at or below its validation accuracy in every epoch: under-fitting.
    assert "NET III (job" in text and "**under-fitting**" in text
    # Exercise 16: NET II bottoms out at epoch 2, one epoch before NET I.
    assert "NET II overfits first" in text and "1 epoch before NET I" in text
    assert "the 3x3 NET I reaches 59.0% and the 5x5 NET II 49.0% (+10.0 points" in text
    assert "are in fc1: P = (1,024 + 1) * 512 = 524,800" in text
    # Exercise 9: NET I's curves separate from epoch 3 (0.65 - 0.6 = 0.05) and end 26 points apart.
    assert "separate from epoch 3 on" in text and "end 26.0 points apart" in text
    # Exercise 18 and 19: chosen on validation, test accuracy beside it.
    assert "No, it under-fits: training accuracy was at or below validation accuracy in 5" in text
    assert "The best job of this report, chosen on validation, is NET IV" in text
    assert "+18.0 points of validation accuracy over NET III's 70.0% (test: +17.0 points" in text
    assert "`augment_flip=True`" in text
    # Rows written without the plain cross-entropy or the data say so.
    assert "n/a, recorded before the service measured the plain cross-entropy" in text


def test_report_needs_succeeded_jobs(client, finished, make_job, expect_error):
    running = make_job("running", net="net1")
    jobs = f"{finished['net1']},{running.id}"
    expect_error(client.get("/report", params={"jobs": jobs}), 409, "job_not_finished")


def test_report_with_an_ablation_reads_the_sweeps_service(
    client, finished, make_job, monkeypatch, expect_error
):
    import sys
    import types

    from app.models import Job

    roles = {"baseline": finished["net3"], "target": finished["net4"]}

    def ablation_jobs(session, sweep_id):
        return [(role, {}, session.get(Job, uuid.UUID(i))) for role, i in roles.items()]

    fake = types.ModuleType("app.sweeps.service")
    fake.ablation_jobs = ablation_jobs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.sweeps", types.ModuleType("app.sweeps"))
    monkeypatch.setitem(sys.modules, "app.sweeps.service", fake)
    sweep = str(uuid.uuid4())
    params = {"jobs": finished["net1"], "ablation": sweep}
    response = client.get("/report", params=params)
    assert response.status_code == 200, response.text
    assert f"### Where the points come from: ablation `{sweep}`" in response.text
    assert "Baseline: NET III, 70.0% (test 72.0%)" in response.text
    assert "The target is +18.0 points of validation accuracy above the baseline" in response.text

    roles.clear()
    expect_error(client.get("/report", params=params), 404, "ablation_not_found")
    expect_error(
        client.get("/report", params={"jobs": finished["net1"], "ablation": "nope"}),
        422,
        "validation_error",
    )


def test_cnn_report_writes_markdown_pngs_and_its_export(
    finished, settings, tmp_path, monkeypatch, capsys
):
    from app.cli import main
    from app.config import get_settings

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        jobs = ",".join(finished[n] for n in ("net1", "net2", "net3", "net4"))
        assert main(["report", "--jobs", jobs, "--out", str(tmp_path)]) == 0
    finally:
        get_settings.cache_clear()
    text = (tmp_path / "results.md").read_text()
    assert "## Exercise 19" in text and f"cnn report --jobs {jobs}" in text
    assert "Generated by `cnn report --from results.export.json` from the export beside" in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "results-compare.png" in pngs and len(pngs) == 5
    assert "](results-compare.png)" in text
    assert "--jobs scripts/report_jobs.json" in text
    assert (tmp_path / "results.export.json").is_file()


def test_cnn_report_repeats_its_own_options(finished, settings, tmp_path, monkeypatch):
    from app.cli import main
    from app.config import get_settings

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    jobs = ",".join(finished[n] for n in ("net3", "net4"))
    args = ["report", "--jobs", jobs, "--out", str(tmp_path), "--name", "cpu.md"]
    args += ["--image-prefix", "pics-", "--jobs-file", "scripts/report_jobs_cpu.json"]
    try:
        assert main(args) == 0
    finally:
        get_settings.cache_clear()
    text = (tmp_path / "cpu.md").read_text()
    command = f"cnn report --jobs {jobs} --out {tmp_path} --name cpu.md --image-prefix pics-"
    assert command + " --jobs-file scripts/report_jobs_cpu.json" in text
    assert "--jobs scripts/report_jobs_cpu.json" in text
    assert sorted(p.name for p in tmp_path.glob("*.png"))[0] == "pics-compare.png"
    assert "](pics-compare.png)" in text
    assert "`cnn report --from cpu.export.json --image-prefix pics-`" in text


def _course_body(body: dict) -> None:
    assert body["precision"] == "float32" and body["epochs"] == 20
    assert body["batch_size"] == 128 and body["validation_split"] == 0.2
    assert not JobCreate.model_validate(body).model_dump().get("augment_flip")


def test_report_jobs_file_is_valid_and_runs_the_course_nets_as_defined():
    bodies = json.loads((Path(__file__).parents[2] / "scripts" / "report_jobs.json").read_text())
    assert [b["net"] for b in bodies][:3] == ["net1", "net2", "net3"]
    for body in bodies:
        JobCreate.model_validate(body)
    for body in bodies[:3]:
        _course_body(body)


def test_cpu_report_jobs_file_is_valid_and_keeps_net3_as_defined():
    path = Path(__file__).parents[2] / "scripts" / "report_jobs_cpu.json"
    bodies = json.loads(path.read_text())
    assert [b["net"] for b in bodies] == ["net3", "net4", "net5"]
    for body in bodies:
        JobCreate.model_validate(body)
    _course_body(bodies[0])
