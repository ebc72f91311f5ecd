"""Consortium file validation, real FLARE provisioning with our kit builder, add-site under the same CA."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from ultrafedfm.cli import main
from ultrafedfm.config import ConfigError
from ultrafedfm.kit.certs import ca_fingerprint, expiring_certificates, find_certificates, read_certificate
from ultrafedfm.kit.consortium import load_consortium
from ultrafedfm.site_config import load_site_config

CONSORTIUM = {
    "name": "ufm-test",
    "server": {"host": "localhost", "fed_learn_port": 18502, "admin_port": 18503, "store_dir": "/srv/ufm-test"},
    "sites": [{"name": "site-1", "org": "h1"}, {"name": "site-2", "org": "h2"}],
    "admins": [{"email": "admin@ufm.org", "org": "ufm", "role": "project_admin"}],
}


def write_consortium(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d["sites"].append({"name": "site-1", "org": "x"}), "sites[2].name"),
        (lambda d: d["server"].update(fed_learn_port=70000), "server.fed_learn_port"),
        (lambda d: d["admins"][0].update(role="root"), "admins[0].role"),
        (lambda d: d["admins"][0].update(email="nobody"), "admins[0].email"),
        (lambda d: d.pop("server"), "server"),
        (lambda d: d.update(sitez=[]), "sitez"),
        (lambda d: d["sites"][0].update(name="bad name"), "sites[0].name"),
        (lambda d: d["sites"][0].update(org="h-1"), "sites[0].org"),
    ],
)
def test_consortium_errors_name_the_key(tmp_path, change, key):
    data = json.loads(json.dumps(CONSORTIUM))
    change(data)
    path = write_consortium(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_consortium(path)
    assert f"key '{key}'" in str(info.value) and str(path) in str(info.value)


def test_example_consortium_file_is_valid():
    example = Path(__file__).resolve().parents[2] / "provisioning" / "consortium.example.yaml"
    config = load_consortium(example)
    assert config.site_names == ["hospital-a", "hospital-b", "hospital-c"]


def test_init_and_add_site_keep_the_root_ca(tmp_path, capsys, caplog):
    consortium = write_consortium(tmp_path, CONSORTIUM)
    ws = tmp_path / "ws"
    assert main(["kit", "init", "--consortium", str(consortium), "--workspace", str(ws)]) == 0
    first = ws / "ufm-test" / "prod_00"
    fingerprint = ca_fingerprint(first / "localhost" / "startup" / "rootCA.pem")
    assert fingerprint in capsys.readouterr().out

    site_local = first / "site-2" / "local"
    site_config = load_site_config(site_local / "site.yaml", site_name="site-2")
    assert site_config.privacy.require_secure_aggregation is True
    for name in ("privacy.json", "authorization.json", "resources.json", "consortium.json"):
        json.loads((site_local / name).read_text())  # valid JSON, placeholders filled
    site_resources = json.loads((site_local / "resources.json").read_text())
    assert "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor" in site_resources["class_allow_list"]
    assert "site-2" in (first / "site-2" / "README.md").read_text()
    server_local = json.loads((first / "localhost" / "local" / "consortium.json").read_text())
    assert server_local["sites"] == ["site-1", "site-2"] and server_local["root_ca_sha256"] == fingerprint
    resources = json.loads((first / "localhost" / "local" / "resources.json").read_text())
    assert "/tmp/nvflare" not in json.dumps(resources) and "/srv/ufm-test/ufm-test/jobs-storage" in json.dumps(resources)

    site1_cert = (first / "site-1" / "startup" / "client.crt").read_bytes()
    assert main(["kit", "add-site", "--consortium", str(consortium), "--workspace", str(ws),
                 "--name", "site-3", "--org", "h3", "--out", str(tmp_path / "kits")]) == 0
    kit = tmp_path / "kits" / "site-3"
    assert ca_fingerprint(kit / "startup" / "rootCA.pem") == fingerprint
    assert read_certificate(kit / "startup" / "client.crt").subject_cn == "site-3"
    assert not (tmp_path / "kits" / "site-1").exists()
    second = ws / "ufm-test" / "prod_01"
    assert (second / "site-1" / "startup" / "client.crt").read_bytes() == site1_cert  # not re-issued
    assert load_consortium(consortium).site_names == ["site-1", "site-2", "site-3"]
    assert json.loads((second / "localhost" / "local" / "consortium.json").read_text())["sites"][-1] == "site-3"

    assert main(["kit", "add-site", "--consortium", str(consortium), "--workspace", str(ws),
                 "--name", "site-3", "--org", "h3", "--out", str(tmp_path / "kits2")]) == 2
    assert not (tmp_path / "kits2").exists()
    assert "site 'site-3' is already in the consortium" in caplog.text


def test_add_site_refuses_a_workspace_without_root_ca(tmp_path):
    consortium = write_consortium(tmp_path, CONSORTIUM)
    with pytest.raises(FileNotFoundError, match="no root CA"):
        main(["kit", "add-site", "--consortium", str(consortium), "--workspace", str(tmp_path / "empty"),
              "--name", "site-3", "--org", "h3", "--out", str(tmp_path / "kits")])


def test_expiry_lists_days_left_and_flags_soon(tmp_path, capsys):
    consortium = write_consortium(tmp_path, {**CONSORTIUM, "cert_valid_days": 40})
    ws = tmp_path / "ws"
    assert main(["kit", "init", "--consortium", str(consortium), "--workspace", str(ws)]) == 0
    capsys.readouterr()
    assert main(["kit", "expiry", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "localhost" in out
    # Participant certificates follow the root's lifetime here; 60 days from now they are inside the window.
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60)
    assert {i.subject_cn for i in expiring_certificates(find_certificates(ws), now=later)} >= {"site-1", "ufm-test"}
    assert main(["kit", "expiry", str(ws), "--warn-days", "400"]) == 1
    assert "RENEW" in capsys.readouterr().out


def test_kit_init_creates_the_membership_key_and_every_kit_carries_the_member_list_kit_check_shows(tmp_path, capsys):
    """`kit init` -> each site enrols its own key -> the admin signs them in -> `kit check` lists every fingerprint;
    `add-site` issues a kit with the current list, and the new site enrols the same way."""
    from ultrafedfm.kit.membership import read_member_list
    from ultrafedfm.kit.preflight import check_site_kit
    from ultrafedfm.secagg import format_fingerprint

    consortium = write_consortium(tmp_path, CONSORTIUM)
    ws = tmp_path / "ws"
    assert main(["kit", "init", "--consortium", str(consortium), "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    membership = ws / "membership"
    assert (membership / "membership_admin_key.pem").stat().st_mode & 0o077 == 0
    first_list = read_member_list(membership / "members.json")
    assert first_list.version == 1 and first_list.members == () and first_list.server == "localhost"
    assert format_fingerprint(first_list.admin_fingerprint) in out and "kit enroll" in out
    kits = ws / "ufm-test" / "prod_00"
    for participant in ("site-1", "site-2", "localhost"):
        assert (kits / participant / "local" / "members.json").read_bytes() == (membership / "members.json").read_bytes()
    assert not list(kits.rglob("secagg_site_key.pem")) and not list(kits.rglob("*admin_key*"))  # no key in any kit
    # Not enrolled yet: kit check says what to do.
    [result] = [r for r in check_site_kit(kits / "site-1", check_data=False, timeout=0.5) if r.name == "membership"]
    assert not result.ok and "secagg_site_key.pem" in result.message and "kit enroll" in result.message

    for site in ("site-1", "site-2"):
        assert main(["kit", "enroll", "--kit", str(kits / site)]) == 0
        fingerprint = capsys.readouterr().out.split("fingerprint: ")[1].splitlines()[0]
        assert main(["kit", "membership", "add", "--workspace", str(ws), "--fingerprint", fingerprint,
                     "--request", str(kits / site / "local" / "secagg_enrollment.json")]) == 0
    member_list = read_member_list(membership / "members.json")
    for participant in ("site-1", "site-2", "localhost"):  # the admin sends the new list to every kit
        (kits / participant / "local" / "members.json").write_bytes((membership / "members.json").read_bytes())
    [result] = [r for r in check_site_kit(kits / "site-2", check_data=False, timeout=0.5) if r.name == "membership"]
    assert result.ok, result.message
    for member in member_list.members:
        assert format_fingerprint(member.fingerprint) in result.message
    assert format_fingerprint(member_list.admin_fingerprint) in result.message

    capsys.readouterr()
    assert main(["kit", "add-site", "--consortium", str(consortium), "--workspace", str(ws),
                 "--name", "site-3", "--org", "h3", "--out", str(tmp_path / "kits")]) == 0
    assert "site-3 is not a member yet" in capsys.readouterr().out
    new_kit = tmp_path / "kits" / "site-3"
    assert read_member_list(new_kit / "local" / "members.json") == member_list  # the current list, same admin key
    assert (membership / "membership_admin_key.pem").is_file() and read_member_list(
        membership / "members.json").admin_key == first_list.admin_key  # add-site never makes a new admin key
