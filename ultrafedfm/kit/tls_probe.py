"""One mutual-TLS handshake from a site kit to the FLARE server, with the failure explained.

FLARE's client retries a failed handshake forever and the server logs nothing about it, so a
site whose kit comes from another CA never learns why it is not joining. This probe makes the
same handshake once (the kit's client certificate, the kit's root CA, ALPN h2 like gRPC) and
turns the TLS error into what to do.
"""
from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["ProbeResult", "probe_server"]


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    handshake_ok: bool
    problem: str = ""  # "", "unreachable", "server_not_trusted", "site_not_trusted", "tls_error"
    detail: str = ""


def probe_server(
    *, host: str, port: int, server_name: str, client_cert: Path, client_key: Path, root_ca: Path,
    timeout: float = 5.0,
) -> ProbeResult:
    """Connect to ``host:port`` and complete a mutual-TLS handshake as this site would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(root_ca))
    context.load_cert_chain(certfile=str(client_cert), keyfile=str(client_key))
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return ProbeResult(False, False, "unreachable", f"{host}:{port}: {exc}")
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            # TLS 1.3 checks the client certificate after the handshake: a server that rejects
            # it closes the connection without answering, one that accepts it answers or waits.
            tls.settimeout(timeout)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: " + server_name.encode() + b"\r\nConnection: close\r\n\r\n")
            try:
                answer = tls.recv(1)
            except (TimeoutError, socket.timeout):
                return ProbeResult(True, True)
            except ssl.SSLError as exc:
                return _classify(exc)
            except (ConnectionResetError, BrokenPipeError) as exc:
                return ProbeResult(True, False, "site_not_trusted", str(exc))
            if not answer:
                return ProbeResult(True, False, "site_not_trusted", "the server closed the connection after the handshake")
        return ProbeResult(True, True)
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(True, False, "server_not_trusted", exc.verify_message or str(exc))
    except ssl.SSLError as exc:
        return _classify(exc)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return ProbeResult(True, False, "site_not_trusted", str(exc))
    except OSError as exc:
        return ProbeResult(True, False, "tls_error", str(exc))
    finally:
        raw.close()


def _classify(exc: ssl.SSLError) -> ProbeResult:
    reason = (getattr(exc, "reason", "") or str(exc)).upper()
    if isinstance(exc, ssl.SSLEOFError) or "EOF" in reason:
        return ProbeResult(True, False, "site_not_trusted", "the server closed the connection after the handshake")
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return ProbeResult(True, False, "site_not_trusted", str(exc))
    return ProbeResult(True, False, "tls_error", str(exc))
