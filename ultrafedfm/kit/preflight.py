"""``ultrafedfm kit check``: everything a site must have right before it starts its FLARE client.

Each check returns a :class:`CheckResult` whose message says what was found and, on failure,
what is wrong and what to do. The checks are independent so that one report shows every
problem at once:

- ``certificate``: ``client.crt`` names this site, is signed by the kit's ``rootCA.pem``, matches
  ``client.key`` and is inside its validity window with more than 30 days left;
- ``root CA``: ``rootCA.pem`` is the consortium's (fingerprint sent by a second channel, or the
  kit's ``local/consortium.json``) and has not expired;
- ``server``: one mutual-TLS handshake with the server named in ``fed_client.json``;
- ``membership``: this site's secure-aggregation signing key, the admin-signed member list in
  ``local/members.json`` against the site's pins, and every member's fingerprint, printed so that
  hospitals compare them out of band (``ultrafedfm.kit.enroll.membership_check``; nothing is written);
- ``site.yaml``, ``data``, ``resources``: the site's own configuration, that it has training
  images (a filled cache, or a DICOM folder one of whose files ingests) and the resources it declares.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.kit.certs import (
    ca_fingerprint, is_signed_by, key_matches_certificate, load_certificate, read_certificate, validity,
)
from ultrafedfm.kit.tls_probe import probe_server

_logger = logging.getLogger(__name__)

__all__ = ["CheckResult", "check_site_kit"]

EXPIRY_WARNING_DAYS = 30
_DICOM_SAMPLE_LIMIT = 200  # files looked at when searching the store for one usable ultrasound file
_RENEW = "ask the consortium admin to renew this site's kit (`ultrafedfm kit expiry <kit>` lists every certificate)"


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
        site_name = client["client"]["fqsn"]
        server = client["servers"][0]
        host, port = server["service"]["target"].rsplit(":", 1)
        identity = server["identity"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return [CheckResult("kit", False, f"{startup / 'fed_client.json'} is missing or incomplete "
                            f"({type(exc).__name__}: {exc}); unpack the kit you were sent again")]
    results.append(_check_certificate(startup, site_name))
    results.append(_check_ca(kit, startup, expected_ca_sha256))
    results.append(_check_server(startup, host, int(port), identity, timeout, own_validity=_own_validity(startup)))
    results.append(_check_membership(kit))
    if check_data:
        results += _check_data(site_config or kit / "local" / "site.yaml", site_name)
    return results


def _check_certificate(startup: Path, site_name: str) -> CheckResult:
    try:
        cert, root = load_certificate(startup / "client.crt"), load_certificate(startup / "rootCA.pem")
        info = read_certificate(startup / "client.crt")
        key_ok = key_matches_certificate(cert, startup / "client.key")
    except (OSError, ValueError) as exc:
        return CheckResult("certificate", False, str(exc))
    if info.subject_cn != site_name:
        return CheckResult("certificate", False, f"client.crt is issued to {info.subject_cn!r} but this kit is for "
                           f"{site_name!r} (fed_client.json): the startup folder was mixed with another site's; "
                           "unpack your own kit again")
    if not is_signed_by(cert, root):
        return CheckResult("certificate", False, f"client.crt is not signed by the kit's rootCA.pem (it names issuer "
                           f"{info.issuer_cn!r}, the kit's CA is {read_certificate(startup / 'rootCA.pem').subject_cn!r}): "
                           "the kit was assembled from two provisionings; ask the consortium admin for a fresh kit")
    if not key_ok:
        return CheckResult("certificate", False, "client.key is not the private key of client.crt: the two files come "
                           "from different kits; unpack your own kit again")
    when = validity(info, warn_days=EXPIRY_WARNING_DAYS)
    if when.state == "not_yet_valid":
        return CheckResult("certificate", False, f"client.crt {when.text}: this machine's clock is probably wrong; "
                           "set it right (NTP), or wait for the date if the kit was issued in advance")
    if when.state == "expired":
        return CheckResult("certificate", False, f"client.crt {when.text}: the server will refuse this site; {_RENEW}")
    if when.state == "expiring":
        return CheckResult("certificate", False, f"client.crt {when.text} (less than {EXPIRY_WARNING_DAYS} days): "
                           f"the site drops out on that day; {_RENEW} now")
    return CheckResult("certificate", True, f"client.crt for {site_name}, signed by the kit's CA, {when.text}")


def _check_ca(kit: Path, startup: Path, expected: str | None) -> CheckResult:
    try:
        fingerprint = ca_fingerprint(startup / "rootCA.pem")
        when = validity(read_certificate(startup / "rootCA.pem"), warn_days=EXPIRY_WARNING_DAYS)
    except (OSError, ValueError) as exc:
        return CheckResult("root CA", False, str(exc))
    consortium_file = kit / "local" / "consortium.json"
    source = "the fingerprint given"
    if expected is None and consortium_file.is_file():
        expected, source = json.loads(consortium_file.read_text()).get("root_ca_sha256"), f"{consortium_file}"
    if expected is not None and fingerprint != expected.lower().replace(":", ""):
        return CheckResult("root CA", False, f"CA mismatch: rootCA.pem is {fingerprint[:16]}..., the consortium's CA is "
                           f"{expected[:16]}... ({source}): this kit comes from another CA; ask the consortium admin "
                           "for a kit issued under the consortium's root CA")
    if when.state in ("expired", "not_yet_valid"):
        return CheckResult("root CA", False, f"rootCA.pem {when.text}: no certificate of the consortium is accepted "
                           "until the consortium admin re-provisions under a new root CA")
    if when.state == "expiring":
        return CheckResult("root CA", False, f"rootCA.pem {when.text}: every kit of the consortium stops working that "
                           "day; tell the consortium admin to re-provision under a new root CA now")
    if expected is None:
        return CheckResult("root CA", True, f"rootCA.pem SHA-256 {fingerprint} (no expected fingerprint to compare: "
                           "compare it with the one the consortium sent you)")
    return CheckResult("root CA", True, f"rootCA.pem matches the consortium's CA ({fingerprint[:16]}...)")


def _own_validity(startup: Path):
    """The validity of the site's own certificate, or ``None`` when it cannot be read."""
    try:
        return validity(read_certificate(startup / "client.crt"), warn_days=EXPIRY_WARNING_DAYS)
    except (OSError, ValueError):
        return None


def _check_server(startup: Path, host: str, port: int, identity: str, timeout: float, *, own_validity=None) -> CheckResult:
    result = probe_server(host=host, port=port, server_name=identity, client_cert=startup / "client.crt",
                          client_key=startup / "client.key", root_ca=startup / "rootCA.pem", timeout=timeout)
    where = f"{host}:{port}"
    if result.handshake_ok:
        return CheckResult("server", True, f"{where} reachable, mutual TLS handshake accepted")
    fed_client = startup / "fed_client.json"
    advice = {
        "kit_files": f"client.crt, client.key and rootCA.pem cannot be used together ({result.detail}); unpack your "
                     "own kit again",
        "unknown_host": f"the server's host name {host!r} does not resolve ({result.detail}): check this machine's DNS, "
                        f"or ask the consortium admin for the server's address ({fed_client} names it)",
        "refused": f"nothing accepts connections on {where} (connection refused): the FLARE server is not running "
                   f"there, or {fed_client} names the wrong host or port; ask the consortium's operator",
        "no_answer": f"no answer from {where} within {timeout:g} s: a firewall drops outbound TCP {port}, or the "
                     "server's host is down; ask your network team to open the port, then the consortium's operator",
        "unreachable": f"cannot connect to {where} ({result.detail}): check this machine's network route to the server",
        "server_not_trusted": f"CA mismatch: the server at {where} presents a certificate not signed by this kit's "
                              f"rootCA.pem ({result.detail}); this kit comes from another CA than the server: ask the "
                              "consortium admin for a kit from the current provisioning",
        "server_cert_expired": f"the server at {where} presents a certificate outside its validity window "
                               f"({result.detail}): tell the consortium's operator to renew the server's kit",
        "server_name_mismatch": f"the server at {where} presents a certificate for another name than {identity!r} "
                                f"({result.detail}): {fed_client} points at the wrong server; ask the consortium admin",
        "site_not_trusted": f"CA mismatch: the server at {where} rejected this site's certificate ({result.detail}); "
                            "the kit was not issued under the server's root CA: ask the consortium admin for a new kit",
        "site_cert_expired": f"the server at {where} rejected this site's certificate as expired ({result.detail}): "
                             f"{_RENEW}",
    }.get(result.problem, f"TLS handshake with {where} failed ({result.detail}); send this line to the consortium's operator")
    if result.problem == "site_not_trusted" and own_validity is not None and own_validity.state in (
            "expired", "not_yet_valid"):
        # FLARE's gRPC server closes the connection without saying why: the site's own expired
        # certificate explains it better than a CA mismatch would.
        advice = (f"the server at {where} rejected this site's certificate ({result.detail}); client.crt "
                  f"{own_validity.text}, which explains it: see the certificate check")
    return CheckResult("server", False, advice)


def _check_membership(kit: Path) -> CheckResult:
    from ultrafedfm.kit.enroll import membership_check  # deferred: cryptography only when checking

    ok, lines = membership_check(kit)
    return CheckResult("membership", ok, "\n    ".join(lines))


def _check_data(config_path: Path, site_name: str) -> list[CheckResult]:
    from ultrafedfm.config import ConfigError
    from ultrafedfm.site_config import load_site_config

    try:
        config = load_site_config(config_path, site_name=site_name)
    except ConfigError as exc:
        return [CheckResult("site.yaml", False, f"{exc}: fix that key")]
    except OSError as exc:
        return [CheckResult("site.yaml", False, f"{config_path} cannot be read ({exc}); copy site.yaml from the "
                            "kit's local/ folder or pass --site-config")]
    return [CheckResult("site.yaml", True, f"{config_path} is valid"), _check_training_data(config, config_path),
            _check_resources(config, config_path)]


def _check_training_data(config, config_path: Path) -> CheckResult:
    """Training needs images: a filled cache, or a DICOM folder (ingested into the cache on first use)."""
    from ultrafedfm.data.cache import CacheNotFoundError, open_cache

    try:
        cache = open_cache(config.cache)
    except (CacheNotFoundError, OSError, ValueError, KeyError):
        cache = None
    if cache is not None:
        return CheckResult("data", True, f"cache {config.cache} holds {len(cache.entries)} images of "
                           f"{cache.image_size} px")
    root = config.dicom
    if root is None:
        return CheckResult("data", False, f"the cache {config.cache} holds no images and {config_path} sets no "
                           "`dicom:` folder: point `dicom:` at the ultrasound DICOM export (ingested on first use), "
                           "or run `ultrafedfm ingest` into the cache")
    if not root.exists():
        return CheckResult("data", False, f"DICOM folder {root} does not exist (`dicom:` in {config_path}): point "
                           "`dicom:` at the folder of the ultrasound DICOM export, or mount it")
    if not root.is_dir():
        return CheckResult("data", False, f"`dicom:` in {config_path} is {root}, a file, not a folder: point it at "
                           "the folder of the ultrasound DICOM export")
    if not os.access(root, os.R_OK | os.X_OK):
        return CheckResult("data", False, f"DICOM folder {root} is not readable by this account: give the service "
                           "account read access to it")
    from ultrafedfm.data.ingest import sample_dicom_folder

    sample = sample_dicom_folder(root, config=_ingest_config(config), limit=_DICOM_SAMPLE_LIMIT)
    if sample.files_looked == 0 and not sample.rejected:
        if next((p for p in root.rglob("*") if p.is_file()), None) is None:
            return CheckResult("data", False, f"DICOM folder {root} is empty (no file in it or below it): check that "
                               "the export ran and that `dicom:` points at its root")
        return CheckResult("data", False, f"every file under {root} is excluded by `ingest.include` / `ingest.exclude` "
                           f"in {config_path}: fix those patterns")
    if sample.usable is not None:
        return CheckResult("data", True, f"DICOM folder {root} readable; {sample.usable} ingests ({sample.images} "
                           f"image(s)); the cache {config.cache} is filled on first use")
    reasons = "; ".join(f"{reason} {n} (e.g. {sample.details[reason]})" for reason, n in sample.rejected.items())
    return CheckResult("data", False, f"none of the first {sample.files_looked} files under {root} can be used: "
                       f"{reasons}. Fix what the reasons say (install the named decoder, export ultrasound as DICOM), "
                       "or run `ultrafedfm ingest` on the folder and read its report")


def _ingest_config(config):
    """The site's ingest settings as an ``IngestConfig`` (``site.yaml`` may hold a mapping or the typed config)."""
    from ultrafedfm.config import from_mapping
    from ultrafedfm.data.ingest_config import IngestConfig

    ingest = getattr(config, "ingest", None) or {}
    return ingest if isinstance(ingest, IngestConfig) else from_mapping(IngestConfig, dict(ingest))


def _check_resources(config, config_path: Path) -> CheckResult:
    declared = getattr(config, "resources", None)
    if declared is None:
        return CheckResult("resources", True, "no resources declared")
    problems = []
    gpus = _gpu_count()
    if declared.gpus > gpus:
        problems.append(f"`resources.gpus` is {declared.gpus} but {gpus} GPU(s) are visible to this account "
                        "(check the driver and CUDA_VISIBLE_DEVICES)")
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if memory_gb < declared.min_memory_gb:
        problems.append(f"`resources.min_memory_gb` is {declared.min_memory_gb:g} but this machine has "
                        f"{memory_gb:.1f} GB")
    probe = config.cache if config.cache.exists() else next((p for p in config.cache.parents if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 2**30
    if free_gb < declared.min_free_disk_gb:
        problems.append(f"`resources.min_free_disk_gb` is {declared.min_free_disk_gb:g} but {probe} (holding the "
                        f"cache {config.cache}) has {free_gb:.1f} GB free")
    if problems:
        return CheckResult("resources", False, "; ".join(problems) + f". Give the machine what {config_path} "
                           "declares, or lower the declaration to what it has")
    return CheckResult("resources", True, f"{gpus} GPU(s), {memory_gb:.0f} GB memory, {free_gb:.0f} GB free disk")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install is reported as no GPU
        return 0
