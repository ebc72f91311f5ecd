"""``ultrafedfm study``: a smoke run on tiny generated data, resuming, the DP arm left unreported."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ultrafedfm.cli import main
from ultrafedfm.study.presets import get_study_preset
from ultrafedfm.study.runner import RUNNING_ELSEWHERE, _claim, plan_units, run_study


def test_smoke_study_runs_every_unit_reports_and_resumes(data_root, tmp_path, capsys):
    out = tmp_path / "study"
    preset = get_study_preset("smoke")
    units = plan_units(preset)
    first = run_study(out=out, preset=preset, data_root=data_root, progress=False, stop_after=3)
    assert first["ran"] == 3 and first["remaining"]
    assert "Partial" in (out / "results.md").read_text()
    # A second process sharing the folder holds the last unit: this one runs the rest, exits 0, says so.
    held = _claim(out, units[-1])
    code = main(["study", "--preset", "smoke", "--out", str(out), "--data-root", str(data_root), "--no-progress"])
    assert code == 0 and "1 unit(s) still running in another process" in capsys.readouterr().out
    status = json.loads((out / "status.json").read_text())
    assert status["ran"] == len(units) - 4 and status["skipped_done"] == 3
    assert status["remaining"] == [units[-1].key] and status["failures"] == {units[-1].key: RUNNING_ELSEWHERE}
    held.unlink()  # that process died before finishing: the next run takes the unit over
    assert run_study(out=out, preset=preset, data_root=data_root, progress=False)["ran"] == 1
    assert not json.loads((out / "status.json").read_text())["remaining"]
    report = (out / "results.md").read_text()
    assert "busi_cls: auroc/benign_vs_malignant" in report and "ddti_seg: dice" in report
    assert (out / "figures" / "ddti_seg_dice.png").is_file()
    # Fine-tuned models of seed 0 at 100 % labels are saved with a card.
    assert (out / "models" / "central" / "busi_cls" / "model.safetensors").is_file()
    assert "95% CI" in (out / "models" / "central" / "busi_cls" / "MODEL_CARD.md").read_text()
    # Pretraining never saw a downstream test image.
    split = json.loads((out / "splits" / "busi.json").read_text())
    listed = (out / "sites" / "busi" / "source" / "labels.csv").read_text().splitlines()[1:]
    assert not {f"data/{name}" for name in split["test_files"]} & set(listed)
    # A rerun does nothing more.
    again = run_study(out=out, preset=preset, data_root=data_root, progress=False)
    assert again["ran"] == 0


@pytest.mark.slow
def test_smoke_study_federated_arms_run_in_the_flare_simulator_with_and_without_dp(data_root, tmp_path):
    preset = dataclasses.replace(get_study_preset("smoke"), arms=("federated", "federated_dp"), tasks=("ddti_seg",),
                                 pretrain_epochs=2, federated_timeout_s=600)
    summary = run_study(out=tmp_path / "study", preset=preset, data_root=data_root, progress=False)
    assert not summary["remaining"], summary["failures"]
    for arm in ("federated", "federated_dp"):
        pre = json.loads((tmp_path / "study" / "results" / "pretrain" / f"{arm}.json").read_text())
        assert pre["rounds"] == 2 and pre["applied_rounds"] == 2
        card = json.loads((tmp_path / "study" / "pretrain" / arm / "encoder.json").read_text())["card"]
        assert "secure aggregation" in card["privacy"]
    # The DP arm's card carries the epsilon each site's own ledger recorded.
    dp_card = json.loads((tmp_path / "study" / "pretrain" / "federated_dp" / "encoder.json").read_text())["card"]
    assert "site-1 epsilon" in dp_card["privacy"] and "no DP-SGD" not in dp_card["privacy"]


def test_a_unit_locked_by_a_live_process_is_skipped_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from ultrafedfm.study.runner import Unit, _claim

    unit = Unit("finetune", "scratch", "busi_cls", 1.0, 0)
    lock = _claim(tmp_path, unit)
    assert lock is not None and lock.read_text().strip() == str(__import__("os").getpid())
    assert _claim(tmp_path, unit) is None  # held by this (live) process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout)  # a process that has exited
    assert _claim(tmp_path, unit) == lock
