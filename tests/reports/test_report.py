"""The report's rules on the fixture export (no database): choosing on validation, comparable
losses, computed explanations, the first test image and the data, exercise 19's points."""

from __future__ import annotations

import builtins
import math
import sys
import types
import uuid
from pathlib import Path

import pytest

from app.errors import AblationNotFound
from app.reports import ablation as ablation_module
from app.reports.architecture import explain_parameters
from app.reports.compare import export_rows
from app.reports.export import (
    ExportError,
    LayerEntry,
    NetEntry,
    ReportExport,
    read_export,
    to_json,
)
from app.reports.markdown import render_report

FIXTURE_EXPORT = Path(__file__).parent / "fixture" / "results.export.json"


@pytest.fixture
def export() -> ReportExport:
    return read_export(FIXTURE_EXPORT)[0]


def render(export: ReportExport) -> str:
    return render_report(export, header="(header)", compare_image="c.png", curve_images={})


def job(export: ReportExport, net: str):
    return next(j for j in export.jobs if j.net == net)


# ----------------------------------------------------------------------------- defect 2
def test_the_best_job_is_chosen_on_validation_and_test_accuracy_is_only_reported(export):
    # NET I gets the best test accuracy of all; it still has the lowest validation accuracy.
    net1 = job(export, "net1")
    assert net1.evaluation is not None
    net1.evaluation.test_accuracy = 0.99
    text = render(export)
    assert "The best job is chosen on validation: NET IV (job `86b19713`)" in text
    assert "Its test accuracy, 86.2%, is reported beside it and played no part" in text
    assert "Validation ranks the jobs NET IV > NET III > NET I > NET II" in text
    assert "the test set would rank them NET I > NET IV > NET III > NET II" in text
    assert "The best job of this report, chosen on validation, is NET IV" in text


def test_a_job_without_validation_data_is_never_chosen_by_its_test_accuracy(export):
    export.jobs = [job(export, "net1")]
    for epoch in export.jobs[0].epochs:
        epoch.val_accuracy = epoch.val_loss = epoch.val_ce_loss = None
    text = render(export)
    assert "No job in this report has validation data, so none is chosen" in text
    assert "The best job" not in text


# ----------------------------------------------------------------------------- defect 3
def test_net3s_verdict_is_under_fitting_with_the_numbers_it_rests_on(export):
    text = render(export)
    assert (
        "No, it under-fits: training accuracy was at or below validation accuracy in 19 of 20 "
        "epochs (more than half)"
    ) in text
    assert "ended 0.039 above it, within the tolerance of 0.043 (5% of the lowest)" in text
    assert "overfits too" not in text
    rows = {r["net"]: r for r in export_rows(export)}
    assert rows["net3"]["verdict"]["kind"] == "underfitting"
    assert rows["net3"]["overfitting_after_epoch"] is None
    assert rows["net1"]["verdict"]["kind"] == "overfitting"
    assert rows["net4"]["verdict"]["kind"] == "still_improving"


# ----------------------------------------------------------------------------- defect 4
def test_losses_are_compared_only_as_plain_cross_entropy(export):
    text = render(export)
    line = next(t for t in text.splitlines() if t.startswith("Validation losses are compared"))
    assert "NET I 1.120, NET II 1.650, NET IV 0.410" in line
    assert "1.12" not in line.split("NET IV")[1]  # NET IV's smoothed val_loss is not there
    assert "NET III" not in line  # recorded before the plain cross-entropy: n/a
    assert "its `val_loss` (1.120) is the smoothed loss and is not compared" in text
    net3_row = next(t for t in text.splitlines() if t.startswith("| `03d93512` | NET III |"))
    assert net3_row.count("| n/a |") == 2  # validation and test CE loss


def test_the_comparison_plot_draws_the_plain_cross_entropy(export, monkeypatch):
    from matplotlib.axes import Axes

    from app.reports.plots import compare_png

    drawn: dict[tuple[str, str], list[float]] = {}
    titles: list[str] = []
    plot, set_title = Axes.plot, Axes.set_title

    def spy_plot(ax, xs, ys, *args, **kwargs):
        if "label" in kwargs:
            drawn[(ax.get_title() or str(id(ax)), kwargs["label"])] = list(ys)
        return plot(ax, xs, ys, *args, **kwargs)

    def spy_title(ax, label, *args, **kwargs):
        titles.append(label)
        return set_title(ax, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy_plot)
    monkeypatch.setattr(Axes, "set_title", spy_title)
    rows = export_rows(export)
    assert compare_png(rows).startswith(b"\x89PNG")
    curves = list(drawn.values())
    net4 = job(export, "net4")
    assert [e.val_ce_loss for e in net4.epochs] in curves
    assert [e.val_loss for e in net4.epochs] not in curves  # the smoothed loss
    assert [e.val_accuracy for e in net4.epochs] in curves
    assert any("plain cross-entropy" in t and "n/a: NET III (03d93512)" in t for t in titles)


# ----------------------------------------------------------------------------- defect 1
def test_exercise_16_explains_net2s_extra_parameters_from_the_summary(export):
    text = render(export)
    assert (
        "NET II has 686,090 parameters against NET I's 193,034 (+493,056). Most of the extra "
        "parameters (393,216, 80%) are in fc1: P = (1,024 + 1) * 512 = 524,800 against "
        "P = (256 + 1) * 512 = 131,584, because it sees 1,024 inputs against 256: the feature "
        "map before flatten is 4x4x64 = 1,024 values against 2x2x64 = 256, as NET II pools "
        "once less (2 poolings against 3)."
    ) in text
    assert "the convolutions (conv1, conv2, conv3) add 99,840 (20%): 5x5 kernels against 3x3" in (
        text
    )


def _layer(name: str, kind: str, inp: list[int], out: list[int], params: int, **kw) -> LayerEntry:
    return LayerEntry(
        name=name,
        type=kind,
        input_shape=inp,
        output_shape=out,
        params=params,
        formula=f"P = {params:,}",
        **kw,
    )


def _net(name: str, layers: list[LayerEntry]) -> NetEntry:
    total = sum(layer.params for layer in layers)
    return NetEntry(
        net=name, title=name.upper(), total_params=total, macs_per_image=0, layers=layers
    )


def test_the_explanation_follows_the_numbers_not_a_fixed_sentence():
    # A net whose extra parameters sit in its convolution: the kernel is named, not fc1.
    small = _net("a", [
        _layer("conv1", "Conv2D", [8, 8, 3], [6, 6, 8], (3 * 3 * 3 + 1) * 8, kernel=[3, 3]),
        _layer("flatten", "Flatten", [6, 6, 8], [288], 0),
        _layer("fc", "Dense", [288], [2], 289 * 2),
    ])  # fmt: skip
    big = _net("b", [
        _layer("conv1", "Conv2D", [8, 8, 3], [6, 6, 8], (7 * 7 * 3 + 1) * 8, kernel=[7, 7]),
        _layer("flatten", "Flatten", [6, 6, 8], [288], 0),
        _layer("fc", "Dense", [288], [2], 289 * 2),
    ])  # fmt: skip
    text = explain_parameters(small, big)
    assert "Most of the extra parameters (960, 100%) are in conv1" in text
    assert "because 7x7 kernels against 3x3" in text
    # Channels, not pooling, before a dense layer.
    wide = _net("c", [
        _layer("conv1", "Conv2D", [8, 8, 3], [6, 6, 32], (3 * 3 * 3 + 1) * 32, kernel=[3, 3]),
        _layer("flatten", "Flatten", [6, 6, 32], [1152], 0),
        _layer("fc", "Dense", [1152], [2], 1153 * 2),
    ])  # fmt: skip
    text = explain_parameters(wide, small)  # either order
    assert "C has" in text and "are in fc: " in text
    assert "as its last convolution has 32 channels against 8" in text
    assert "pools" not in text


# ----------------------------------------------------------------------------- defect 5
def test_first_test_image_and_data_source_are_in_the_report(export):
    text = render(export)
    assert "| job | net | true class | predicted | match | airplane | automobile |" in text
    assert "| `88232785` | NET II | cat | dog | no | 0.050 |" in text
    assert "Not recorded for NET III (job `03d93512`)." in text
    data = job(export, "net1").evaluation.data
    assert data is not None
    assert f"`cifar10-jpeg.tar.gz` (sha256 `{data.sha256}`" in text
    assert (
        "The first test image is the first of the test/ images sorted by path, then permuted "
        "by numpy.random.default_rng(0).permutation (app/ml/data.py): test/cat/0577.jpg."
    ) in text


# ----------------------------------------------------------------------------- defect 6
def test_each_lever_gets_its_points_added_and_removed_and_interactions_are_named(export):
    assert export.ablation is not None
    rows, measures = ablation_module.lever_points(export.ablation)
    by_lever = {p.lever: p for p in rows}
    assert list(by_lever) == [
        "architecture",
        "augmentation",
        "label_smoothing",
        "adamw",
        "schedule",
        "training_share",
    ]
    arch = by_lever["architecture"]
    assert arch.added == pytest.approx(0.70 - 0.62) and arch.removed == pytest.approx(0.80 - 0.68)
    aug = by_lever["augmentation"]
    assert aug.added == pytest.approx(0.02) and aug.removed == pytest.approx(0.06)
    assert aug.added_test == pytest.approx(0.015) and aug.removed_test == pytest.approx(0.055)
    # Noise: 2 standard errors of added - removed, from the four binomial variances.
    pairs = [measures[r] for r in ("baseline", "baseline+augmentation")]
    pairs += [measures[r] for r in ("target-augmentation", "target")]
    by_hand = 2 * math.sqrt(
        sum(m.val_accuracy * (1 - m.val_accuracy) / m.validation_images for m in pairs)
    )
    assert aug.noise == pytest.approx(by_hand) and aug.interaction is True
    assert by_lever["label_smoothing"].interaction is False
    assert by_lever["schedule"].removed is None and by_lever["schedule"].interaction is None
    assert by_lever["training_share"].split_differs()
    assert measures["baseline"].validation_images == 10_000
    assert measures["target"].validation_images == 5_000

    text = render(export)
    assert (
        "| augmentation | `augment_crop` 0 -> 4, `augment_flip` False -> True | +2.0 | +6.0 | "
        "+1.5 | +5.5 |"
    ) in text
    assert "augmentation: +2.0 points added to the baseline, +6.0 points removed from the " in text
    assert "the lever's effect depends on the other levers" in text
    assert "label_smoothing: +0.5 points added to the baseline, +0.6 points removed" in text
    assert "Not succeeded, so n/a above: `target-schedule` (failed)." in text
    assert "14 jobs with the same budget, 4 epochs (a reduced budget: the course trains 20)" in text


def test_an_ablation_without_some_roles_says_n_a(export):
    assert export.ablation is not None
    export.ablation.entries = [e for e in export.ablation.entries if e.role != "net4+none"]
    rows, _ = ablation_module.lever_points(export.ablation)
    assert rows[0].lever == "architecture" and rows[0].added is None
    assert rows[0].removed == pytest.approx(0.12)
    assert "| architecture | `net` net3 -> net4 | n/a | +12.0 |" in render(export)


def test_a_report_without_an_ablation_says_how_to_get_one(export):
    export.ablation = None
    text = render(export)
    assert "needs an ablation's jobs: `cnn report --ablation SWEEP_ID`" in text
    assert "### Where the points come from" not in text


def test_the_adapter_reads_the_sweeps_service_lazily(monkeypatch):
    sweep = uuid.uuid4()
    monkeypatch.delitem(sys.modules, "app.sweeps.service", raising=False)
    real_import = builtins.__import__

    def without_sweeps(name, *args, **kwargs):
        if name.startswith("app.sweeps"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="app.sweeps")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_sweeps)
    with pytest.raises(AblationNotFound, match="no sweeps"):
        ablation_module.ablation_jobs(None, sweep)  # type: ignore[arg-type]

    def sweeps_missing_a_dependency(name, *args, **kwargs):
        if name.startswith("app.sweeps"):
            raise ModuleNotFoundError("No module named 'optuna'", name="optuna")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", sweeps_missing_a_dependency)
    with pytest.raises(ModuleNotFoundError, match="optuna"):  # a broken install is not a 404
        ablation_module.ablation_jobs(None, sweep)  # type: ignore[arg-type]
    monkeypatch.setattr(builtins, "__import__", real_import)

    fake = types.ModuleType("app.sweeps.service")
    answers: list = []
    fake.ablation_jobs = lambda session, sweep_id: answers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app.sweeps", types.ModuleType("app.sweeps"))
    monkeypatch.setitem(sys.modules, "app.sweeps.service", fake)
    with pytest.raises(AblationNotFound, match="not an ablation"):
        ablation_module.ablation_jobs(None, sweep)  # type: ignore[arg-type]
    answers.append(("baseline", {}, object()))
    assert ablation_module.ablation_jobs(None, sweep) == answers  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- defect 7
def test_an_export_round_trips_and_bad_exports_say_what_is_wrong(export, tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    good.write_text(to_json(export))
    assert read_export(good)[0] == export

    cases = {
        "not json": "{",
        "another format": to_json(export).replace("cnn-report-export", "something-else", 1),
        "a net nobody describes": to_json(export).replace('"net": "net1"', '"net": "net9"', 1),
    }
    for label, content in cases.items():
        bad = tmp_path / f"{label}.json"
        bad.write_text(content)
        with pytest.raises(ExportError, match="is not a report export") as err:
            read_export(bad)
        assert str(bad) in str(err.value), label
    with pytest.raises(ExportError, match="cannot read the export"):
        read_export(tmp_path / "missing.json")
    monkeypatch.setattr("app.reports.export.MAX_EXPORT_BYTES", 100)
    with pytest.raises(ExportError, match="an export is at most 100 bytes"):
        read_export(good)


def test_cnn_report_from_a_bad_export_exits_2_with_the_reason(tmp_path, capsys):
    from app.cli import main

    bad = tmp_path / "bad.export.json"
    bad.write_text("[]")
    assert main(["report", "--from", str(bad), "--out", str(tmp_path)]) == 2
    assert "is not a report export" in capsys.readouterr().err
    assert main(["report", "--from", str(bad), "--jobs", str(uuid.uuid4())]) == 2
    assert "--from reads every job from the export" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "name the jobs: --jobs" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))


def test_the_table_shows_the_tta_accuracy_beside_the_plain_one():
    from app.reports.markdown import table

    row = {
        "id": "0123456789",
        "net": "net5",
        "title": "NET V",
        "parameters": 1_973_944,
        "macs": 118_147_360,
        "epochs": 10,
        "precision": "float32",
        "device": "CPU",
        "training_seconds": 600.0,
        "kept_epoch": 10,
        "val_accuracy": None,
        "val_ce_loss": None,
        "test_accuracy": 0.8821,
        "test_ce_loss": 0.5,
        "verdict": None,
    }
    assert "| 88.2% (TTA 89.1%) |" in table([row | {"tta_accuracy": 0.891}])
    assert "| 88.2% |" in table([row | {"tta_accuracy": None}])
