"""On a real `nvflare provision` workspace: FLARE certificates and keys no longer make anyone a site.

The attacks of issue 9, reproduced with the certificates and private keys FLARE actually writes:
the server's ``server.crt`` and the admin's ``client.crt`` chain to the project root CA (the old
check accepted them as sites), and ``state/cert.json`` holds every participant's private key.
With the pinned member list and site-generated keys, each is refused.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from ultrafedfm.kit.enroll import SiteFiles, enroll_site, open_site
from ultrafedfm.kit.membership import (
    EnrollmentRequest, MemberEntry, add_member, init_membership, load_admin_key, read_member_list, write_member_list,
)
from ultrafedfm.secagg import (
    AdvertiseKeys, IdentityError, KeyRoster, MembershipError, RoundContext, SecAggClient, SecAggConfig, SecAggServer,
    SiteIdentity, load_certificate,
)
from ultrafedfm.secagg.identity import verify_signed_by_site

SERVER = "server1.example.org"
ADMIN = "admin@ufm.org"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
CONTEXT = RoundContext(model_sha256="12" * 32, lr=1e-4, training={"local_steps": 2})


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A real FLARE provisioning (server, 3 hospitals, project admin), each hospital enrolled with its own key."""
    root = tmp_path_factory.mktemp("provision")
    project = {
        "api_version": 3, "name": "ufm-sybil", "description": "sybil test",
        "participants": [
            {"name": SERVER, "type": "server", "org": "consortium", "fed_learn_port": 18702, "admin_port": 18703},
            *({"name": s, "type": "client", "org": s.replace("-", "_")} for s in SITES),
            {"name": ADMIN, "type": "admin", "org": "ufm", "role": "project_admin"},
        ],
        "builders": [{"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
                     {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
                     {"path": "nvflare.lighter.impl.cert.CertBuilder"}],
    }
    (root / "project.yml").write_text(yaml.safe_dump(project))
    proc = subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p", "project.yml", "-w", "ws"],
                          cwd=root, capture_output=True, text=True, env={"HOME": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kits = root / "ws" / "ufm-sybil" / "prod_00"
    membership = root / "ws" / "membership"
    init_membership(membership, consortium="ufm-sybil", server=SERVER)
    admin_key = load_admin_key(membership / "membership_admin_key.pem")
    member_list = read_member_list(membership / "members.json")
    for site in SITES:
        (kits / site / "local" / "consortium.json").write_text(json.dumps(
            {"consortium": "ufm-sybil", "server": {"host": SERVER}, "sites": SITES}))
        enrollment = enroll_site(kits / site)
        member_list = add_member(member_list, EnrollmentRequest.read(enrollment.request),
                                 confirmed_fingerprint=enrollment.fingerprint, admin_key=admin_key)
    write_member_list(membership / "members.json", member_list)
    for participant in (*SITES, SERVER):
        shutil.copyfile(membership / "members.json", kits / participant / "local" / "members.json")
    return root / "ws" / "ufm-sybil", kits, membership


def _flare_signer(pem: bytes, cert_path: Path) -> SiteIdentity:
    """A FLARE participant's certificate and private key, as whoever holds the kit or state/cert.json has them."""
    return SiteIdentity(load_certificate(cert_path), serialization.load_pem_private_key(pem, password=None))


def _client(kits: Path, site: str) -> SecAggClient:
    files = SiteFiles.in_kit(kits / site)
    material = open_site(files, consortium="ufm-sybil", server=SERVER)
    return SecAggClient(signer=material.signer, members=material.members, job_id="job-1", round_number=0,
                        config=SecAggConfig(), context=CONTEXT, ledger=material.ledger)


def _forged_advert(sender: str, signer: SiteIdentity, context: bytes) -> AdvertiseKeys:
    """Key advertisement for ``sender`` with fresh keys, signed with a FLARE private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    unsigned = AdvertiseKeys(sender=sender, job_id="job-1", round=0,
                             c_public=X25519PrivateKey.generate().public_key().public_bytes(*raw),
                             s_public=X25519PrivateKey.generate().public_key().public_bytes(*raw),
                             context=context, signature=b"")
    return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_payload()))


def test_sybil_roster_with_the_servers_and_admins_certificates_is_refused(deployment):
    _, kits, _ = deployment
    root_ca = load_certificate(kits / "hospital-a" / "startup" / "rootCA.pem")
    server = _flare_signer((kits / SERVER / "startup" / "server.key").read_bytes(), kits / SERVER / "startup" / "server.crt")
    admin = _flare_signer((kits / ADMIN / "startup" / "client.key").read_bytes(), kits / ADMIN / "startup" / "client.crt")
    # The hole: the old check ("issued by the project CA, CN = claimed name") accepts both as sites.
    for name, identity in ((SERVER, server), (ADMIN, admin)):
        verify_signed_by_site(certificate_pem=identity.certificate_pem, data=b"keys", signature=identity.sign(b"keys"),
                              site_name=name, root_ca=root_ca)
    # The roster {hospital-a, server, admin} with min_sites 3: hospital-a refuses it.
    victim = _client(kits, "hospital-a")
    mine = victim.advertise_keys()
    roster = KeyRoster(sender="server", job_id="job-1", round=0, advertisements=(
        mine, _forged_advert(SERVER, server, mine.context), _forged_advert(ADMIN, admin, mine.context)))
    with pytest.raises(IdentityError, match=f"'{SERVER}' is not a member site of consortium 'ufm-sybil'"):
        victim.share_keys(roster)
    # ... and the server's own state machine refuses them too
    members = open_site(SiteFiles.in_kit(kits / "hospital-b"), consortium="ufm-sybil").members
    sa = SecAggServer(members=members, job_id="job-1", round_number=0, config=SecAggConfig(), context=CONTEXT)
    with pytest.raises(IdentityError, match=f"'{ADMIN}' is not a member site"):
        sa.receive_advertisement(_forged_advert(ADMIN, admin, mine.context))


def test_member_list_naming_the_server_or_an_admin_as_a_site_is_refused(deployment, tmp_path):
    """Even a list the admin signed cannot make the server or an admin account a member."""
    _, _, membership = deployment
    admin_key = load_admin_key(membership / "membership_admin_key.pem")
    current = read_member_list(membership / "members.json")
    some_key = current.members[0].public_key[::-1]
    for entry, match in ((MemberEntry(name=SERVER, public_key=some_key), "the aggregation server's name"),
                         (MemberEntry(name=ADMIN, public_key=some_key), "not a site name"),
                         (MemberEntry(name="hospital-x", public_key=some_key, role="server"), "has role 'server'")):
        forged = dataclasses.replace(current, version=current.version + 1,
                                     members=(*current.members, entry)).signed(admin_key)
        write_member_list(tmp_path / "members.json", forged)
        with pytest.raises(MembershipError, match=match):
            read_member_list(tmp_path / "members.json")


def test_advertisements_signed_with_flare_keys_from_the_provisioning_state_are_refused(deployment):
    """state/cert.json holds hospital-b's FLARE key and the server's and admin's: none can sign as hospital-b."""
    state, kits, _ = deployment
    cert_state = json.loads((state / "state" / "cert.json").read_text())
    victim = _client(kits, "hospital-a")
    mine = victim.advertise_keys()
    genuine = {s: _client(kits, s).advertise_keys() for s in ("hospital-b", "hospital-c")}
    for holder, cert in (("hospital-b", kits / "hospital-b" / "startup" / "client.crt"),
                         (SERVER, kits / SERVER / "startup" / "server.crt"),
                         (ADMIN, kits / ADMIN / "startup" / "client.crt")):
        signer = _flare_signer(cert_state[holder]["pri_key"].encode(), cert)
        forged = _forged_advert("hospital-b", signer, mine.context)
        attacked = _client(kits, "hospital-a")  # a refused round is over for that client: one per attempt
        roster = KeyRoster(sender="server", job_id="job-1", round=0,
                           advertisements=(attacked.advertise_keys(), forged, genuine["hospital-c"]))
        with pytest.raises(IdentityError, match="signature of site 'hospital-b' over its round keys .*does not verify "
                                                "with the key the member list pins"):
            attacked.share_keys(roster)
    # the site-generated keys work: a roster of the three genuine advertisements is accepted
    roster = KeyRoster(sender="server", job_id="job-1", round=0, advertisements=(mine, *genuine.values()))
    shares = victim.share_keys(roster)
    assert set(shares.ciphertexts) == {"hospital-b", "hospital-c"}
    assert np.all([len(c) > 0 for c in shares.ciphertexts.values()])
