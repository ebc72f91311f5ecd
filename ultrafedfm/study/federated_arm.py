"""The federated arms of the study: FedAvg MAE pretraining with secure aggregation (and optionally
DP-SGD at every site) in the NVIDIA FLARE simulator.

THE ONLY study module that imports the FLARE layer (``ultrafedfm.flare.*``) and the federation's
run files; if those module paths move, update the imports here and nowhere else.

One FLARE client per shared data set (its site cache), the project's pretraining job with the
same model, batch, base learning rate and warm-up as the centralized arm, one local epoch per
round and as many rounds as the centralized arm has epochs: the same image-epochs. Secure
aggregation is on (the server unmasks only the sum of the sites' weighted deltas). The run's
state lives outside the simulator workspace (``RunState``), so a rerun after a kill continues
at the next round. The final global MAE is exported as ``encoder.safetensors`` with a card.

With ``dp`` every site trains with DP-SGD (Opacus) at the job's target epsilon
(:data:`DP_TARGET_EPSILON`, delta 1/(10 N) per site, per-image clipping at 1.0), charged in each
site's own ledger beside its cache; the card reports the epsilon each ledger records.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Mapping

import torch

from ultrafedfm.models.export import save_encoder
from ultrafedfm.study.pretrain_arms import ENCODER_FILE, encoder_card, pretrain_config
from ultrafedfm.study.presets import StudyPreset

_logger = logging.getLogger(__name__)

__all__ = ["FederatedArmError", "run_federated_pretraining"]

DP_TARGET_EPSILON = 8.0


class FederatedArmError(RuntimeError):
    """The simulated federation did not complete its rounds (the message names the log)."""


def _job_spec(preset: StudyPreset, *, n_sites: int, largest_site: int, run_dir: Path, run_name: str, dp: bool):
    from ultrafedfm.federation.job_spec import JOB_SPECS
    from ultrafedfm.privacy.dp.config import DPConfig

    base = JOB_SPECS["mae_pretrain_tiny" if preset.model_preset == "tiny" else "mae_pretrain"]
    config = pretrain_config(preset)
    return dataclasses.replace(
        base, name=f"study_{run_name}", preset=preset.model_preset, img_size=preset.img_size,
        num_rounds=preset.pretrain_epochs, warmup_rounds=min(preset.pretrain_warmup, preset.pretrain_epochs),
        local_epochs=1, local_steps=None, batch_size=config.batch_size, base_lr=config.base_lr,
        weight_decay=config.weight_decay, seed=config.seed, min_sites=n_sites, secure_aggregation=True,
        secagg_max_weight=float(2 ** math.ceil(math.log2(max(largest_site, 2)))),
        secagg_max_sites=max(32, n_sites), round_timeout_s=int(preset.federated_timeout_s),
        run_name=run_name, run_state_dir=str(run_dir), export_encoder=False,
        dp=DPConfig(enabled=True, target_epsilon=DP_TARGET_EPSILON, max_grad_norm=1.0) if dp else DPConfig(),
    )


def _privacy_spent(sites: Mapping[str, Path], names: list[str]) -> str:
    """Each site's epsilon as its own ledger records it (the DP arm is the only one that charges)."""
    from ultrafedfm.privacy.dp.ledger import read_ledger, site_ledger_path

    parts = []
    for name, cache in zip(names, sites.values()):
        spent = read_ledger(site_ledger_path(cache), site_name=name).spent()
        if spent.charges:
            parts.append(f"{name} epsilon {spent.epsilon:.2f} (delta {spent.delta:.1e})")
    return "; ".join(parts) or "no charge recorded"


def run_federated_pretraining(*, sites: Mapping[str, Path], site_images: Mapping[str, int], preset: StudyPreset,
                              out: Path, dp: bool = False) -> tuple[Path, list[dict], str]:
    """Run (or continue) the federated arm; returns ``out/encoder.safetensors``, the round statistics and
    the privacy spent (as the sites' ledgers record it)."""
    from ultrafedfm.federation.run_state import RunState
    from ultrafedfm.flare.deploy.job_builder import export_job_folder
    from ultrafedfm.flare.deploy.simulation import prepare_workspace, run_simulation

    out = Path(out).resolve()
    run_dir = out / "run"
    run_name = "federated_dp" if dp else "federated"
    names = [f"site-{i}" for i in range(1, len(sites) + 1)]
    spec = _job_spec(preset, n_sites=len(sites), largest_site=max(site_images[k] for k in sites), run_dir=run_dir,
                     run_name=run_name, dp=dp)
    state = RunState(run_dir, run_name)
    done = len(state.read_rounds())
    if done < spec.num_rounds:
        job_dir = export_job_folder(spec, out / "job", python=sys.executable)
        workspace = out / "flare"
        # One torch thread per simulated site: N site processes share the machine's cores.
        configs = {n: {"cache": str(Path(c).resolve()), "num_threads": 1, "num_workers": 0, "device": "auto"}
                   for n, c in zip(names, sites.values())}
        prepare_workspace(workspace, site_configs=configs)
        _logger.info("%s arm: %d sites (%s), rounds %d..%d of %d, secure aggregation on%s", run_name, len(names),
                     ", ".join(f"{n}={s}" for n, s in zip(names, sites)), done + 1, spec.num_rounds, spec.num_rounds,
                     f", DP-SGD at target epsilon {DP_TARGET_EPSILON}" if dp else "")
        result = run_simulation(job_dir=job_dir, workspace=workspace, clients=names,
                                timeout_s=preset.federated_timeout_s)
        rows = state.read_rounds()
        if len(rows) < spec.num_rounds:
            raise FederatedArmError(f"the federated arm completed {len(rows)} of {spec.num_rounds} rounds "
                                    f"(simulator exit code {result.returncode}); see {result.server_log}. "
                                    "Rerun the study to continue from the last completed round")
    rows = state.read_rounds()
    final = state.dir / "final_model.pt"
    if not final.is_file():
        raise FederatedArmError(f"{final} was not written although {len(rows)} rounds completed; see the server log "
                                f"under {out / 'flare'}")
    from ultrafedfm.train.pretrain import build_model

    model = build_model(pretrain_config(preset))
    model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True), strict=True)
    applied = sum(1 for r in rows if r.get("applied"))
    privacy = "secure aggregation (the server saw only the sum of masked deltas); "
    spent = _privacy_spent(sites, names) if dp else ""
    privacy += (f"DP-SGD at target epsilon {DP_TARGET_EPSILON} per site; ledgers: {spent}" if dp
                else "no DP-SGD (epsilon = inf)")
    card = encoder_card(
        title=f"UltraFedFM encoder, federated MAE{' with DP-SGD' if dp else ''} (study arm)", preset=preset,
        sites={k: site_images[k] for k in sites}, rounds=len(rows),
        training=f"FedAvg over {len(sites)} simulated sites (one per data set), 1 local epoch per round, "
                 f"{applied} of {len(rows)} rounds applied", privacy=privacy)
    return save_encoder(model, out / ENCODER_FILE, card=card), rows, privacy
