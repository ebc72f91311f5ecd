"""``ultrafedfm kit check``: everything a site must have right before it starts its FLARE client.

Each check returns a :class:`CheckResult` whose message says what was found and, on failure,
what to do. The checks are independent so that one report shows every problem at once.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.kit.certs import ca_fingerprint, is_signed_by, load_certificate, read_certificate
from ultrafedfm.kit.tls_probe import probe_server

_logger = logging.getLogger(__name__)

__all__ = ["CheckResult", "check_site_kit"]

EXPIRY_WARNING_DAYS = 30
_DICOM_SAMPLE_LIMIT = 200  # files looked at when searching the store for one ultrasound sample


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str


def check_site_kit(
    kit: Path, *, site_config: Path | None = None, expected_ca_sha256: str | None = None,
    timeout: float = 5.0, check_data: bool = True,
) -> list[CheckResult]:
    """Run every pre-flight check for the site kit in ``kit`` and return the results."""
    kit = Path(kit)
    startup = kit / "startup"
    results: list[CheckResult] = []
    try:
        client = json.loads((startup / "fed_client.json").read_text())
    except (OSError, ValueError) as exc:
        return [CheckResult("kit", False, f"{startup / 'fed_client.json'} unreadable ({exc}); unpack the kit you were sent again")]
    site_name = client["client"]["fqsn"]
    server = client["servers"][0]
    host, port = server["service"]["target"].rsplit(":", 1)
    results.append(_check_certificate(startup, site_name))
    results.append(_check_ca(kit, startup, expected_ca_sha256))
    results.append(_check_server(startup, host, int(port), server["identity"], timeout))
    if check_data:
        results += _check_data(kit, site_config or kit / "local" / "site.yaml", site_name)
    return results


def _check_certificate(startup: Path, site_name: str) -> CheckResult:
    try:
        info = read_certificate(startup / "client.crt")
        cert, root = load_certificate(startup / "client.crt"), load_certificate(startup / "rootCA.pem")
    except (OSError, ValueError) as exc:
        return CheckResult("certificate", False, str(exc))
    if info.subject_cn != site_name:
        return CheckResult("certificate", False, f"client.crt names {info.subject_cn!r}, the kit is for {site_name!r}: "
                           "the startup folder was mixed with another site's; unpack your own kit again")
    if not is_signed_by(cert, root):
        return CheckResult("certificate", False, "client.crt is not signed by the kit's rootCA.pem: the kit was assembled "
                           "from two provisionings; ask the consortium admin for a fresh kit")
    days = info.days_left()
    if days < 0:
        return CheckResult("certificate", False, f"client.crt expired {-days} days ago: ask the consortium admin to renew "
                           "this site's kit (`ultrafedfm kit expiry` lists every certificate)")
    if days < EXPIRY_WARNING_DAYS:
        return CheckResult("certificate", False, f"client.crt expires in {days} days (< {EXPIRY_WARNING_DAYS}): ask the "
                           "consortium admin to renew this site's kit now, before the site drops out")
    return CheckResult("certificate", True, f"client.crt for {site_name}, valid {days} more days")


def _check_ca(kit: Path, startup: Path, expected: str | None) -> CheckResult:
    try:
        fingerprint = ca_fingerprint(startup / "rootCA.pem")
    except (OSError, ValueError) as exc:
        return CheckResult("root CA", False, str(exc))
    consortium_file = kit / "local" / "consortium.json"
    if expected is None and consortium_file.is_file():
        expected = json.loads(consortium_file.read_text()).get("root_ca_sha256")
    if expected is None:
        return CheckResult("root CA", True, f"rootCA.pem SHA-256 {fingerprint} (no expected fingerprint to compare)")
    if fingerprint != expected.lower().replace(":", ""):
        return CheckResult("root CA", False, f"CA mismatch: rootCA.pem is {fingerprint[:16]}..., the consortium's CA is "
                           f"{expected[:16]}...: this kit comes from another CA; ask the consortium admin for a kit "
                           "issued under the consortium's root CA")
    return CheckResult("root CA", True, f"rootCA.pem matches the consortium's CA ({fingerprint[:16]}...)")


def _check_server(startup: Path, host: str, port: int, identity: str, timeout: float) -> CheckResult:
    result = probe_server(host=host, port=port, server_name=identity, client_cert=startup / "client.crt",
                          client_key=startup / "client.key", root_ca=startup / "rootCA.pem", timeout=timeout)
    where = f"{host}:{port}"
    if result.handshake_ok:
        return CheckResult("server", True, f"{where} reachable, mutual TLS handshake accepted")
    advice = {
        "unreachable": f"cannot connect to {where} ({result.detail}): check the firewall allows outbound TCP {port} "
                       "and that the server is running",
        "server_not_trusted": f"CA mismatch: the server at {where} presents a certificate not signed by this kit's "
                              f"rootCA.pem ({result.detail}); this kit comes from another CA than the server — ask the "
                              "consortium admin for a kit from the current provisioning",
        "site_not_trusted": f"CA mismatch: the server at {where} rejected this site's certificate ({result.detail}); "
                            "the kit was not issued under the server's root CA — ask the consortium admin for a new kit",
    }.get(result.problem, f"TLS handshake with {where} failed: {result.detail}")
    return CheckResult("server", False, advice)


def _check_data(kit: Path, config_path: Path, site_name: str) -> list[CheckResult]:
    from ultrafedfm.config import ConfigError
    from ultrafedfm.site_config import load_site_config

    try:
        config = load_site_config(config_path, site_name=site_name)
    except ConfigError as exc:
        return [CheckResult("site.yaml", False, str(exc))]
    results = [CheckResult("site.yaml", True, f"{config_path} is valid")]
    results.append(_check_dicom_sample(config))
    results.append(_check_resources(config))
    return results


def _check_dicom_sample(config) -> CheckResult:
    from ultrafedfm.data.ingest import ingest_dicom_folder
    from ultrafedfm.data.ingest_config import IngestConfig
    from ultrafedfm.config import from_mapping

    root = config.dicom
    if root is None:
        if config.cache.is_dir() and os.access(config.cache, os.R_OK):
            return CheckResult("data", True, f"cache {config.cache} readable (no DICOM store configured)")
        return CheckResult("data", False, f"neither `dicom:` nor an existing `cache:` ({config.cache}) in site.yaml: "
                           "point `dicom:` at the ultrasound DICOM export")
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        return CheckResult("data", False, f"DICOM folder {root} is missing or not readable by this account: fix "
                           "`dicom:` in site.yaml or the folder's permissions")
    ingest_config = from_mapping(IngestConfig, config.ingest)
    candidates = [p for _, p in zip(range(_DICOM_SAMPLE_LIMIT), (p for p in root.rglob("*") if p.is_file()))]
    if not candidates:
        return CheckResult("data", False, f"DICOM folder {root} holds no files: check the export")
    with tempfile.TemporaryDirectory(prefix="ufm-check-") as tmp:
        sample_dir = Path(tmp) / "sample"
        sample_dir.mkdir()
        for i, path in enumerate(candidates):
            shutil.copy(path, sample_dir / f"{i:04d}.dcm")
            summary = ingest_dicom_folder(source=sample_dir, cache=Path(tmp) / "cache", config=ingest_config,
                                          workers=1, progress=False)
            if summary.added:
                return CheckResult("data", True, f"DICOM folder {root} readable; a sample file ingested "
                                   f"({summary.images_written} image(s))")
            (sample_dir / f"{i:04d}.dcm").unlink()
    return CheckResult("data", False, f"none of the first {len(candidates)} files under {root} ingested; run "
                       "`ultrafedfm ingest` on the folder and read its report for the reason of each file")


def _check_resources(config) -> CheckResult:
    declared = getattr(config, "resources", None)
    if declared is None:
        return CheckResult("resources", True, "no resources declared")
    problems = []
    gpus = _gpu_count()
    if declared.gpus > gpus:
        problems.append(f"declares {declared.gpus} GPU(s), {gpus} visible")
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if memory_gb < declared.min_memory_gb:
        problems.append(f"needs {declared.min_memory_gb} GB memory, has {memory_gb:.1f}")
    probe = config.cache if config.cache.exists() else next((p for p in config.cache.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 2**30
    if free_gb < declared.min_free_disk_gb:
        problems.append(f"needs {declared.min_free_disk_gb} GB free for the cache at {config.cache}, has {free_gb:.1f}")
    if problems:
        return CheckResult("resources", False, "; ".join(problems) + ": fix `resources:` in site.yaml or the machine")
    return CheckResult("resources", True, f"{gpus} GPU(s), {memory_gb:.0f} GB memory, {free_gb:.0f} GB free disk")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install is reported as no GPU
        return 0
