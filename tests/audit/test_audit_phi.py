"""No PHI in any report, nor in the cache files the site's audit reads.

Synthetic ultrasound DICOM (``ultrafedfm.data.synth``) gets a patient's name, ID, birth date,
institution and accession number planted in its headers, and lives in a folder named after the
patient; one more file there is not ultrasound (rejected, with the patient's name in its path) and
one text file carries the name in its file name. The site ingests the folder, takes part in a job
(a DP ledger charge, its masked upload logged, its own figures), and both reports are written.
"""
from __future__ import annotations

import json

import numpy as np
import pydicom

from ultrafedfm.data.cache import local_report_dir
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.synth import generate_sites
from ultrafedfm.federation.site_figures import SiteRoundFigures, append_site_figures, site_figures_path
from ultrafedfm.privacy.audit import record_outgoing, record_received, write_server_report, write_site_report
from ultrafedfm.privacy.dp import DPConfig, PrivacyLedger, plan_job, site_ledger_path
from ultrafedfm.privacy.policy import PrivacyPolicy

PATIENT = "Zyxwvutson^Quintessa"
PHI = {"PatientName": PATIENT, "PatientID": "PID-90817263", "PatientBirthDate": "19230405",
       "InstitutionName": "Saint Qwertyuiop Hospital", "ReferringPhysicianName": "Drbrainfog^Ottoline",
       "AccessionNumber": "ACC77553311"}
FOLDER = "Zyxwvutson_Quintessa_PID-90817263"
SECRETS = [*PHI.values(), "Zyxwvutson", "Quintessa", "Qwertyuiop", "Drbrainfog", "90817263", FOLDER]


def _plant(source, tmp_path):
    """The synthetic site's DICOM, re-identified: PHI in every header, all under a folder named after the patient."""
    site_dir = generate_sites(out_dir=tmp_path / "synth", n_sites=1, images_per_site=2, seed=3, image_size=(80, 96),
                              cine_fraction=0.0, progress=False, workers=1)[0]
    patient_dir = source / FOLDER
    patient_dir.mkdir(parents=True)
    files = sorted(p for p in (site_dir / "dicom").rglob("*") if p.is_file())
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.save_as(patient_dir / f"{PATIENT.replace('^', '_')}_{i}.dcm")
    ds.Modality = "CT"  # a file ingest rejects: its path names the patient
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(patient_dir / "Zyxwvutson_CT.dcm")
    (patient_dir / "Zyxwvutson notes.txt").write_text(f"{PATIENT} referred by Drbrainfog\n")
    return len(files)


def test_phi_planted_in_headers_and_folder_names_reaches_no_report(tmp_path):
    source, cache = tmp_path / "pacs", tmp_path / "cache"
    n_files = _plant(source, tmp_path)
    summary = ingest_dicom_folder(source=source, cache=cache, config=IngestConfig(image_size=32), workers=1,
                                  progress=False)
    assert summary.added == n_files and summary.rejected == {"not_dicom": 1, "not_ultrasound": 1}
    # A job at this site: its ledger, its upload (logged at both ends) and its own figures.
    policy = PrivacyPolicy(max_epsilon=8.0)
    plan = plan_job(DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp"), policy, site_name="site-1",
                    job="phi_job", num_images=summary.images_written * 20, batch_size=4, rounds=1, local_epochs=1)
    ledger = PrivacyLedger(site_ledger_path(cache), site_name="site-1")
    charge = ledger.charge_round(plan, job_id="job-phi", round_index=0, policy=policy)
    ledger.record_completion(charge, steps_taken=plan.steps_per_round, clipping="ghost")
    params = {"__secagg__": np.arange(64, dtype=np.uint8)}
    record_outgoing(cache, site="site-1", job_id="job-phi", task="train", round_index=0, params=params)
    record_received(tmp_path / "run", site="site-1", job_id="job-phi", task="train", round_index=0, params=params)
    append_site_figures(site_figures_path(cache), SiteRoundFigures(
        job="phi_job", job_id="job-phi", round=0, loss=0.4, num_samples=summary.images_written, steps=3,
        train_seconds=1.0, masked=True, epsilon=charge.epsilon_job, delta=charge.delta))
    (tmp_path / "run" / "rounds.jsonl").write_text(json.dumps(
        {"round": 0, "num_rounds": 1, "lr": 1e-3, "targets": ["site-1"], "participants": ["site-1"], "failed": {},
         "global_loss": 0.4, "total_images": summary.images_written, "total_steps": 3, "applied": True}) + "\n")

    site = write_site_report(site="site-1", cache=cache, policy=policy, job_id="job-phi", out_dir=tmp_path / "out-site")
    server = write_server_report(run_dir=tmp_path / "run", job_id="job-phi", out_dir=tmp_path / "out-server")
    report = json.loads(site.json.read_text())
    assert report["ingestion"]["not_used_by_reason"] == {"not_dicom": 1, "not_ultrasound": 1}
    assert report["ingestion"]["images_in_cache"] == summary.images_written
    read_by_audit = [cache / s["name"] for s in report["sources"]]
    assert {s["name"] for s in report["sources"]} >= {"ingest_report.csv", "ingest_summary.json", "manifest.jsonl",
                                                      "privacy/dp_ledger.json", "privacy/outgoing_payloads.jsonl"}
    for path in [site.json, site.html, server.json, server.html, *read_by_audit]:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret!r} in {path.name}"
        assert str(tmp_path).encode() not in content or path in read_by_audit, f"a local path in {path.name}"
    # The site's IT still finds the rejected files: the LOCAL list beside the cache names them.
    local = (local_report_dir(cache) / "ingest_report.csv").read_text()
    assert f"{FOLDER}/Zyxwvutson_CT.dcm" in local and "Zyxwvutson notes.txt" in local
    assert not local_report_dir(cache).is_relative_to(cache)
