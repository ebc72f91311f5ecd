"""One mutual-TLS handshake from a site kit to the FLARE server, with the failure explained.

FLARE's client retries a failed handshake forever and the server logs nothing about it, so a
site whose kit comes from another CA never learns why it is not joining. This probe makes the
same handshake once (the kit's client certificate, the kit's root CA, ALPN h2 like gRPC) and
turns the socket or TLS error into one :data:`PROBLEMS` value the pre-flight check explains.
"""
from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["PROBLEMS", "ProbeResult", "probe_server"]

# What can stop a site from joining, as seen from the site:
PROBLEMS = (
    "kit_files",                 # the kit's certificate, key or root CA cannot be loaded together
    "unknown_host",              # the server's host name does not resolve
    "refused",                   # the host answers but nothing listens on the port
    "no_answer",                 # no answer within the timeout (firewall dropping packets, host down)
    "unreachable",               # another network error (no route, network down)
    "server_not_trusted",        # the server's certificate does not chain to the kit's root CA
    "server_cert_expired",       # the server's certificate is out of its validity window
    "server_name_mismatch",      # the server's certificate is for another name than fed_client.json's identity
    "site_not_trusted",          # the server rejected this site's certificate (another CA)
    "site_cert_expired",         # the server rejected this site's certificate as expired
    "tls_error",                 # anything else in the handshake
)

# OpenSSL X509_V_ERR_* codes the client sees when verifying the server's certificate.
_VERIFY_EXPIRED = {9, 10}  # not yet valid, has expired
_VERIFY_HOSTNAME = {62}
# How long to wait for the server to speak first after the handshake (or alert a rejected client).
_FIRST_WORD_S = 1.0


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    handshake_ok: bool
    problem: str = ""  # "" or one of PROBLEMS
    detail: str = ""


def probe_server(
    *, host: str, port: int, server_name: str, client_cert: Path, client_key: Path, root_ca: Path,
    timeout: float = 5.0,
) -> ProbeResult:
    """Connect to ``host:port`` and complete a mutual-TLS handshake as this site would."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(root_ca))
        context.load_cert_chain(certfile=str(client_cert), keyfile=str(client_key))
        context.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        return ProbeResult(False, False, "kit_files", f"{type(exc).__name__}: {exc}")
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        return ProbeResult(False, False, "unknown_host", f"{host}: {exc.strerror or exc}")
    except ConnectionRefusedError:
        return ProbeResult(False, False, "refused", "connection refused")
    except (TimeoutError, socket.timeout):
        return ProbeResult(False, False, "no_answer", f"no answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(False, False, "unreachable", exc.strerror or str(exc))
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            # TLS 1.3 checks the client certificate after the handshake: a server that rejects it
            # sends an alert (or just closes), one that accepts it speaks first (HTTP/2's server
            # preface from gRPC) or answers the stray request below. Read first: writing after
            # the alert arrived reports a bare EOF and loses the alert's reason.
            tls.settimeout(min(timeout, _FIRST_WORD_S))
            outcome = _read_answer(tls)
            if outcome is None:
                tls.settimeout(timeout)
                try:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: " + server_name.encode() + b"\r\nConnection: close\r\n\r\n")
                except ssl.SSLError as exc:
                    return _classify(exc)
                outcome = _read_answer(tls) or ProbeResult(True, True)
            return outcome
    except ssl.SSLCertVerificationError as exc:
        detail = exc.verify_message or str(exc)
        if exc.verify_code in _VERIFY_EXPIRED:
            return ProbeResult(True, False, "server_cert_expired", detail)
        if exc.verify_code in _VERIFY_HOSTNAME:
            return ProbeResult(True, False, "server_name_mismatch", detail)
        return ProbeResult(True, False, "server_not_trusted", detail)
    except ssl.SSLError as exc:
        return _classify(exc)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return ProbeResult(True, False, "site_not_trusted", str(exc))
    except OSError as exc:
        return ProbeResult(True, False, "tls_error", str(exc))
    finally:
        raw.close()


def _read_answer(tls: ssl.SSLSocket) -> ProbeResult | None:
    """What the server does after the handshake: answers (accepted), alerts or closes (rejected),
    or says nothing within the socket's timeout (``None``)."""
    try:
        answer = tls.recv(1)
    except (TimeoutError, socket.timeout):
        return None
    except ssl.SSLError as exc:
        return _classify(exc)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return ProbeResult(True, False, "site_not_trusted", str(exc))
    if not answer:
        return ProbeResult(True, False, "site_not_trusted", "the server closed the connection after the handshake")
    return ProbeResult(True, True)


def _classify(exc: ssl.SSLError) -> ProbeResult:
    """A TLS alert or error after the client accepted the server: what the server said about us."""
    reason = (getattr(exc, "reason", "") or str(exc)).upper()
    if "CERTIFICATE_EXPIRED" in reason:
        return ProbeResult(True, False, "site_cert_expired", str(exc))
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        return ProbeResult(True, False, "site_not_trusted", "the server closed the connection after the handshake")
    if any(alert in reason for alert in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "DECRYPT_ERROR",
                                         "CERTIFICATE_UNKNOWN")):
        return ProbeResult(True, False, "site_not_trusted", str(exc))
    return ProbeResult(True, False, "tls_error", str(exc))
