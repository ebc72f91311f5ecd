"""``ultrafedfm kit``: provision a consortium, add a site, check a site, list certificate expiry.

``kit init`` also creates the project admin's secure-aggregation membership key and the signed
member list (``<workspace>/membership/``); every kit carries the current ``members.json``. Sites
enrol their own keys with ``kit enroll`` and the admin adds them with ``kit membership add``
(``ultrafedfm.cli.kit_members``); ``kit check`` prints every member's fingerprint.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from ultrafedfm.config import to_mapping

_logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("kit", help="consortium kits: init, add-site, check, expiry")
    kit_sub = parser.add_subparsers(dest="kit_command", metavar="KIT_COMMAND", required=True)

    init = kit_sub.add_parser("init", help="provision a consortium (root CA + one kit per participant)")
    init.add_argument("--consortium", type=Path, required=True, help="consortium.yaml (see provisioning/)")
    init.add_argument("--workspace", type=Path, required=True, help="provisioning workspace; keep it: it holds the root CA")
    init.add_argument("--templates", type=Path, default=None, help="site template folder (default: site_templates/)")
    init.set_defaults(func=_init)

    add = kit_sub.add_parser("add-site", help="issue one new site's kit under the same root CA")
    add.add_argument("--consortium", type=Path, required=True)
    add.add_argument("--workspace", type=Path, required=True)
    add.add_argument("--name", required=True, help="the site's name (its certificate's common name)")
    add.add_argument("--org", required=True, help="the site's organisation")
    add.add_argument("--out", type=Path, required=True, help="folder to put the new kit in")
    add.add_argument("--templates", type=Path, default=None)
    add.set_defaults(func=_add_site)

    check = kit_sub.add_parser("check", help="pre-flight check at a site (certificate, CA, server, data, resources)")
    check.add_argument("--kit", type=Path, required=True, help="the site's kit folder")
    check.add_argument("--site-config", type=Path, default=None, help="default: KIT/local/site.yaml")
    check.add_argument("--ca-fingerprint", default=None, help="expected root CA SHA-256 (default: KIT/local/consortium.json)")
    check.add_argument("--timeout", type=float, default=5.0)
    check.add_argument("--no-data", action="store_true", help="skip the data and resource checks")
    check.set_defaults(func=_check)

    expiry = kit_sub.add_parser("expiry", help="every certificate below a folder with the days it has left")
    expiry.add_argument("path", type=Path, help="a provisioning workspace or a kit")
    expiry.add_argument("--warn-days", type=int, default=30)
    expiry.set_defaults(func=_expiry)

    from ultrafedfm.cli.kit_members import add_kit_subcommands  # secure-aggregation membership (enroll, members)

    add_kit_subcommands(kit_sub)


def _init(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.provisioning import provision_consortium
    from ultrafedfm.kit.consortium import load_consortium

    config = load_consortium(args.consortium)
    result = provision_consortium(config, workspace=args.workspace, template_dir=args.templates)
    print(f"root CA SHA-256: {result.root_ca_sha256}  (send it to every site by a second channel)")
    for name, path in sorted(result.kits.items()):
        print(f"  {name:30s} {path}")
    _print_membership(result)
    print("Next, for secure aggregation: each site's IT runs `ultrafedfm kit enroll --kit KIT` and sends you its "
          "secagg_enrollment.json and, by phone, its fingerprint; you run `ultrafedfm kit membership add --workspace "
          f"{args.workspace} --request FILE --fingerprint FP` for each, then send the new members.json to every "
          "site and the server for their local/ folder.")
    return 0


def _print_membership(result) -> None:
    from ultrafedfm.kit.membership import read_member_list
    from ultrafedfm.secagg.signing import format_fingerprint

    member_list = read_member_list(result.members)
    print(f"member list: {result.members} (v{member_list.version}, {len(member_list.members)} member sites; a copy "
          "is in every kit's local/)")
    print(f"membership admin key fingerprint: {format_fingerprint(member_list.admin_fingerprint)}  (give it to "
          "every site by a second channel: their kit check shows it)")
    if result.membership_key is not None:
        print(f"membership key: {result.membership_key} (0600; created now). Whoever holds it can add members: "
              "keep it offline (e.g. on removable media) and pass --key to `kit membership add`.")


def _add_site(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.provisioning import add_site_kit
    from ultrafedfm.kit.consortium import SiteSpec, load_consortium

    config = load_consortium(args.consortium)
    updated, kit = add_site_kit(config, SiteSpec(name=args.name, org=args.org), workspace=args.workspace,
                                out_dir=args.out, template_dir=args.templates)
    args.consortium.write_text(yaml.safe_dump(to_mapping(updated), sort_keys=False))
    server_allow_list = args.workspace.resolve() / updated.name
    print(f"kit for {args.name}: {kit}")
    print(f"{args.consortium} now lists {len(updated.sites)} sites. Copy the new server allow-list "
          f"(<newest prod_NN>/{updated.server.host}/local/consortium.json under {server_allow_list}) "
          "to the server's local/ folder; no other kit changes.")
    print(f"Secure aggregation: {args.name} is not a member yet. Its IT runs `ultrafedfm kit enroll --kit <its kit>` "
          "and sends you secagg_enrollment.json and, by phone, its fingerprint; you run `ultrafedfm kit membership "
          f"add --workspace {args.workspace} --request FILE --fingerprint FP` and send the new members.json to "
          "every site and the server (each site pins the new member and logs its fingerprint).")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.preflight import check_site_kit

    results = check_site_kit(args.kit, site_config=args.site_config, expected_ca_sha256=args.ca_fingerprint,
                             timeout=args.timeout, check_data=not args.no_data)
    for r in results:
        print(f"[{'ok' if r.ok else 'FAIL'}] {r.name}: {r.message}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _expiry(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.certs import find_certificates, read_certificate, validity

    paths = find_certificates(args.path)
    if not paths:
        print(f"no certificates under {args.path}")
        return 1
    flags = {"expired": "EXPIRED", "not_yet_valid": "NOT-YET", "expiring": "RENEW", "ok": "ok"}
    soon = 0
    seen: set[str] = set()
    for path in paths:
        info = read_certificate(path)
        if info.fingerprint in seen:
            continue  # rootCA.pem is in every kit
        seen.add(info.fingerprint)
        when = validity(info, warn_days=args.warn_days)
        soon += when.state != "ok"
        print(f"{flags[when.state]:8s} {when.days:5d} days  {info.subject_cn:35s} (issuer {info.issuer_cn})  "
              f"{when.text}  {path}")
    if soon:
        print(f"{soon} certificate(s) expired, not yet valid or expiring within {args.warn_days} days: a site whose "
              "certificate is listed needs a renewed kit from the consortium admin; an expiring root CA means "
              "re-provisioning the whole consortium")
    return 1 if soon else 0
