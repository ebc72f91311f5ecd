"""Round statistics reach FLARE's info collector (what `nvflare job stats` / `show_stats` print)."""
from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from ultrafedfm.config import to_mapping
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.stats import RoundStats, format_round_line
from ultrafedfm.flare.server.controller import MaePretrainController


def _collect(controller: MaePretrainController) -> dict:
    fl_ctx = FLContext()
    collector = GroupInfoCollector()
    fl_ctx.set_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, collector, private=True, sticky=False)
    controller.handle_event(InfoCollector.EVENT_TYPE_GET_STATS, fl_ctx)
    return collector.info


def test_controller_publishes_aggregate_round_stats_to_the_info_collector():
    controller = MaePretrainController(spec=to_mapping(JOB_SPECS["mae_pretrain_tiny"]))
    info = _collect(controller)["MaePretrainController"]
    assert info["num_rounds"] == 3 and info["current_round"] is None and "last_round" not in info

    stats = RoundStats(round=0, num_rounds=3, lr=1e-4, targets=["site-1", "site-2", "site-3"],
                       participants=["site-1", "site-3"], failed={"site-2": "no result"}, global_loss=0.9,
                       total_images=120, total_steps=16, bytes_received=1234, duration_s=2.5, applied=True)
    controller.progress.last_stats, controller.progress.current_round = stats, 1
    last = _collect(controller)["MaePretrainController"]["last_round"]
    assert last == {"round": 1, "participants": ["site-1", "site-3"], "failed": {"site-2": "no result"},
                    "global_loss": 0.9, "total_images": 120, "total_steps": 16, "bytes_received": 1234,
                    "duration_s": 2.5, "applied": True}  # aggregates only: no site's loss, images or time


def test_round_line_names_failures_and_skipped_updates():
    stats = RoundStats(round=1, num_rounds=3, lr=1e-4, targets=["a", "b"], participants=["a"], failed={"b": "x"},
                       message="only 1 valid update(s)")
    line = format_round_line(stats)
    assert line.startswith("round 2/3  sites 1/2") and "failed: b: x" in line and "NOT updated" in line


def test_a_round_record_of_an_older_version_is_read_without_its_per_site_figures():
    row = {"round": 0, "num_rounds": 1, "lr": 1e-4, "targets": ["a"], "participants": ["a"], "failed": {},
           "loss": {"a": 0.5}, "num_samples": {"a": 10}, "train_seconds": {"a": 1.0}, "global_loss": 0.5,
           "bytes_received": 1, "duration_s": 1.0, "applied": True, "message": ""}
    stats = RoundStats.from_dict(row)
    assert not {"loss", "num_samples", "train_seconds"} & set(stats.to_dict()) and stats.global_loss == 0.5
