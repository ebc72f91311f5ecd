"""Enrolment, the admin-signed member list, and the keys each site pins (CLI and library)."""
from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from ultrafedfm.cli import main
from ultrafedfm.kit.enroll import SiteFiles, membership_check, open_site
from ultrafedfm.kit.membership import (
    EnrollmentRequest, add_member, generate_admin_key, load_admin_key, read_member_list, remove_member,
    write_member_list,
)
from ultrafedfm.kit.pins import PinStore
from ultrafedfm.kit.simulation_members import make_simulation_members
from ultrafedfm.kit.site_key import ensure_site_key
from ultrafedfm.secagg import (
    IdentityError, MembershipError, SecAggConfig, SiteSigningKey, format_fingerprint, simulate_round,
)

SITES = ["hospital-a", "hospital-b", "hospital-c"]
CONSORTIUM = {
    "name": "ufm-test",
    "server": {"host": "fl.ufm.example.org", "fed_learn_port": 18502, "admin_port": 18503, "store_dir": "/srv/ufm"},
    "sites": [{"name": s, "org": s.replace("-", "_")} for s in SITES],
    "admins": [{"email": "admin@ufm.org", "org": "ufm", "role": "project_admin"}],
}


def make_kit(root: Path, site: str) -> Path:
    """The parts of a site kit membership needs: FLARE's fed_client.json and our consortium.json."""
    kit = root / site
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    (kit / "startup" / "fed_client.json").write_text(json.dumps({"client": {"fqsn": site}}))
    (kit / "local" / "consortium.json").write_text(json.dumps(
        {"consortium": "ufm-test", "server": {"host": "fl.ufm.example.org"}, "sites": SITES}))
    return kit


@pytest.fixture
def enrolled(tmp_path, capsys):
    """Three kits enrolled through the CLI, the admin's workspace, and the member list installed everywhere."""
    (tmp_path / "consortium.yaml").write_text(yaml.safe_dump(CONSORTIUM))
    ws = tmp_path / "ws"
    assert main(["kit", "membership", "init", "--workspace", str(ws), "--consortium",
                 str(tmp_path / "consortium.yaml")]) == 0
    kits = {}
    for site in SITES:
        kits[site] = make_kit(tmp_path / "kits", site)
        assert main(["kit", "enroll", "--kit", str(kits[site])]) == 0
        out = capsys.readouterr().out
        fingerprint = out.split("fingerprint: ")[1].splitlines()[0]  # what IT reads to the admin
        request = kits[site] / "local" / "secagg_enrollment.json"
        assert main(["kit", "membership", "add", "--workspace", str(ws), "--request", str(request),
                     "--fingerprint", fingerprint]) == 0
    capsys.readouterr()
    for kit in kits.values():
        shutil.copyfile(ws / "membership" / "members.json", kit / "local" / "members.json")
    return ws, kits


def test_enrol_through_the_cli_and_kit_check_lists_every_fingerprint(enrolled, capsys):
    ws, kits = enrolled
    key_file = kits["hospital-a"] / "local" / "secagg_site_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    request = json.loads((kits["hospital-a"] / "local" / "secagg_enrollment.json").read_text())
    assert "PRIVATE" not in json.dumps(request) and set(request) >= {"site", "public_key", "fingerprint"}
    assert stat.S_IMODE((ws / "membership" / "membership_admin_key.pem").stat().st_mode) == 0o600
    member_list = read_member_list(ws / "membership" / "members.json")
    assert member_list.version == 4 and [m.name for m in member_list.members] == SITES
    ok, lines = membership_check(kits["hospital-b"])
    assert ok, lines
    text = "\n".join(lines)
    for m in member_list.members:
        assert f"{m.name:24s} {format_fingerprint(m.fingerprint)}" in text
    assert "hospital-b" in text.split("(this site")[0].splitlines()[-1]
    assert format_fingerprint(member_list.admin_fingerprint) in text
    # the CLI prints the same lines and exits 0; enrolling again keeps the key
    assert main(["kit", "members", "--kit", str(kits["hospital-b"])]) == 0
    assert format_fingerprint(member_list.members[2].fingerprint) in capsys.readouterr().out
    before = key_file.read_bytes()
    assert main(["kit", "enroll", "--kit", str(kits["hospital-a"])]) == 0
    assert key_file.read_bytes() == before and "already there, unchanged" in capsys.readouterr().out


def test_admin_refuses_an_enrolment_whose_fingerprint_was_not_confirmed(enrolled, tmp_path, capsys):
    ws, _ = enrolled
    kit = make_kit(tmp_path / "more", "hospital-d")
    assert main(["kit", "enroll", "--kit", str(kit)]) == 0
    capsys.readouterr()
    swapped = SiteSigningKey.generate(site="hospital-d").fingerprint  # e.g. the file was swapped in transit
    assert main(["kit", "membership", "add", "--workspace", str(ws), "--request",
                 str(kit / "local" / "secagg_enrollment.json"), "--fingerprint", swapped]) == 1
    assert "the file may have been swapped in transit" in capsys.readouterr().out
    assert read_member_list(ws / "membership" / "members.json").version == 4  # unchanged
    # a request whose key was replaced in the file fails its proof of possession
    data = json.loads((kit / "local" / "secagg_enrollment.json").read_text())
    other = EnrollmentRequest.create(consortium="ufm-test", key=SiteSigningKey.generate(site="hospital-d"))
    data["public_key"] = other.to_json()["public_key"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(MembershipError, match="not signed by the key it carries"):
        EnrollmentRequest.read(tmp_path / "bad.json")


def test_altered_member_list_fails_the_admins_signature(enrolled, tmp_path):
    ws, _ = enrolled
    data = json.loads((ws / "membership" / "members.json").read_text())
    attacker = SiteSigningKey.generate(site="hospital-b")
    data["members"][1]["public_key"] = EnrollmentRequest.create(consortium="ufm-test", key=attacker).to_json()[
        "public_key"]
    data["members"][1]["fingerprint"] = attacker.fingerprint
    (tmp_path / "members.json").write_text(json.dumps(data))
    with pytest.raises(MembershipError, match="the admin's signature does not verify"):
        read_member_list(tmp_path / "members.json")


def _reissue(ws: Path, kits: dict[str, Path], change) -> None:
    """The admin (or whoever holds the membership key) signs a new version and it reaches every kit."""
    key = load_admin_key(ws / "membership" / "membership_admin_key.pem")
    updated = change(read_member_list(ws / "membership" / "members.json"), key)
    write_member_list(ws / "membership" / "members.json", updated)
    for kit in kits.values():
        shutil.copyfile(ws / "membership" / "members.json", kit / "local" / "members.json")


def test_a_replaced_member_key_is_refused_until_the_sites_it_accepts_it(enrolled, tmp_path, caplog):
    ws, kits = enrolled
    files = SiteFiles.in_kit(kits["hospital-a"])
    first = open_site(files)  # first use: pins the admin key and all three members
    assert PinStore(files.pins).members == {m.name: m.fingerprint for m in first.members.members}
    # whoever holds the membership key swaps hospital-b's key for their own
    attacker = SiteSigningKey.generate(site="hospital-b")
    _reissue(ws, kits, lambda ml, key: add_member(ml, EnrollmentRequest.create(consortium="ufm-test", key=attacker),
                                                  confirmed_fingerprint=attacker.fingerprint, admin_key=key,
                                                  replace_key=True))
    with pytest.raises(MembershipError, match=r"changes the key of \['hospital-b'\].*accept-site"):
        open_site(files)
    ok, lines = membership_check(kits["hospital-a"])
    assert not ok and "CHANGED since pinned" in "\n".join(lines)
    # hospital-a's IT calls hospital-b, hears another fingerprint: nothing is accepted
    with pytest.raises(MembershipError, match="not the key the member list gives 'hospital-b'"):
        PinStore(files.pins).accept_member(read_member_list(files.members), name="hospital-b",
                                           fingerprint=SiteSigningKey.generate(site="x").fingerprint)
    # ... or hears this one (a genuine key change): accepted through the CLI, the list is usable again
    assert main(["kit", "members", "--kit", str(kits["hospital-a"]), "--accept-site", "hospital-b",
                 "--fingerprint", format_fingerprint(attacker.fingerprint)]) == 0
    assert open_site(files).members.key_of("hospital-b") == attacker.public_key


def test_another_admin_key_a_rollback_and_new_members(enrolled, tmp_path, caplog):
    ws, kits = enrolled
    files = SiteFiles.in_kit(kits["hospital-c"])
    open_site(files)
    old = (kits["hospital-c"] / "local" / "members.json").read_bytes()
    # a new site joins (v5): pinned on first use with a warning naming its fingerprint
    newcomer = SiteSigningKey.generate(site="hospital-d")
    _reissue(ws, kits, lambda ml, key: add_member(ml, EnrollmentRequest.create(consortium="ufm-test", key=newcomer),
                                                  confirmed_fingerprint=newcomer.fingerprint, admin_key=key))
    with pytest.raises(MembershipError, match=r"new members \['hospital-d'\] need this site's IT to accept them"):
        open_site(files, auto_pin_new=False)
    with caplog.at_level(logging.WARNING):
        assert open_site(files).members.size == 4
    assert f"pinned a new member key {format_fingerprint(newcomer.fingerprint)} of 'hospital-d'" in caplog.text
    # the old v4 again: a rollback
    (kits["hospital-c"] / "local" / "members.json").write_bytes(old)
    with pytest.raises(MembershipError, match="version 4 is older than version 5"):
        open_site(files)
    # a list signed by a different membership key (e.g. a re-initialised workspace)
    rogue_key = generate_admin_key(tmp_path / "rogue.pem")
    current = read_member_list(ws / "membership" / "members.json")
    write_member_list(files.members, remove_member(current, "hospital-d", admin_key=rogue_key))
    with pytest.raises(MembershipError, match="signed by admin key .* but this site pinned"):
        open_site(files)
    assert main(["kit", "members", "--kit", str(kits["hospital-c"]), "--accept-admin",
                 read_member_list(files.members).admin_fingerprint]) == 0
    assert open_site(files).members.names == ("hospital-a", "hospital-b", "hospital-c")


def test_site_key_problems_are_refused_naming_the_file(enrolled, tmp_path):
    ws, kits = enrolled
    files = SiteFiles.in_kit(kits["hospital-a"])
    files.signing_key.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others .*chmod 600"):
        open_site(files)
    files.signing_key.unlink()
    with pytest.raises(IdentityError, match="no secure-aggregation signing key at .*run `ultrafedfm kit enroll"):
        open_site(files)
    ensure_site_key(files.signing_key, site="hospital-a")  # a new key, not enrolled
    with pytest.raises(IdentityError, match="the member list enrols key .* but .* holds"):
        open_site(files)
    stranger = SiteFiles.in_kit(make_kit(tmp_path / "x", "hospital-z"))
    ensure_site_key(stranger.signing_key, site="hospital-z")
    shutil.copyfile(ws / "membership" / "members.json", stranger.members)
    with pytest.raises(MembershipError, match="site 'hospital-z' is not in the member list"):
        open_site(stranger)


def test_simulation_members_run_a_round_with_site_held_keys_and_ledgers(tmp_path):
    files, server_members = make_simulation_members(tmp_path / "ids", ["site-1", "site-2", "site-3"])
    materials = {name: open_site(f) for name, f in files.items()}
    assert all(stat.S_IMODE(f.signing_key.stat().st_mode) == 0o600 for f in files.values())
    assert read_member_list(server_members).to_membership() == materials["site-1"].members
    deltas = {n: np.full(16, 0.2, np.float32) for n in files}
    result = simulate_round(signers={n: m.signer for n, m in materials.items()}, members=materials["site-1"].members,
                            deltas=deltas, weights=dict.fromkeys(files, 2.0), config=SecAggConfig(max_weight=10.0),
                            ledgers={n: m.ledger for n, m in materials.items()}).result
    assert np.allclose(result.mean_delta(), 0.2, atol=1e-6)
    assert all(f.ledger.is_file() for f in files.values())


def test_a_site_whose_policy_says_confirm_new_members_refuses_a_new_member_until_its_it_accepts_it(enrolled):
    from ultrafedfm.kit.identity import open_site_material
    from ultrafedfm.privacy.policy import PrivacyPolicy
    from ultrafedfm.site_config import SiteConfig

    ws, kits = enrolled
    kit = kits["hospital-a"]
    strict = SiteConfig(cache=kit / "cache", privacy=PrivacyPolicy(confirm_new_members=True))
    assert open_site_material(strict, kit_root=kit, site_name="hospital-a").members.size == 3
    newcomer = SiteSigningKey.generate(site="hospital-d")
    _reissue(ws, kits, lambda ml, key: add_member(ml, EnrollmentRequest.create(consortium="ufm-test", key=newcomer),
                                                  confirmed_fingerprint=newcomer.fingerprint, admin_key=key))
    with pytest.raises(MembershipError, match=r"new members \['hospital-d'\] need this site's IT to accept them"):
        open_site_material(strict, kit_root=kit, site_name="hospital-a")
    assert main(["kit", "members", "--kit", str(kit), "--accept-site", "hospital-d",
                 "--fingerprint", format_fingerprint(newcomer.fingerprint)]) == 0
    assert open_site_material(strict, kit_root=kit, site_name="hospital-a").members.size == 4
    # the default policy pins the newcomer on sight (with a WARNING), as before
    lenient = SiteConfig(cache=kits["hospital-b"] / "cache")
    assert open_site_material(lenient, kit_root=kits["hospital-b"], site_name="hospital-b").members.size == 4
