"""``ultrafedfm kit enroll | members | membership``: who may take part in secure aggregation.

Site IT:
    kit enroll --kit KIT                     create this site's signing key, print its fingerprint
    kit members --kit KIT                    show the member list and every fingerprint
    kit members --kit KIT --accept-site hospital-b --fingerprint "ab12 ..."   accept a changed key
    kit members --kit KIT --accept-admin "ab12 ..."                           accept a new admin key
Project admin (membership files in WORKSPACE/membership/):
    kit membership init --workspace WS --consortium consortium.yaml [--key PATH]
    kit membership add --workspace WS --request secagg_enrollment.json --fingerprint "ab12 ..." [--replace]
    kit membership remove --workspace WS --name hospital-b
    kit membership show --workspace WS

No ``register`` here: ``ultrafedfm.cli.kit`` adds these to its own sub-commands.
"""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Callable

_logger = logging.getLogger(__name__)

__all__ = ["add_kit_subcommands"]

MEMBERSHIP_DIR = "membership"


def _explained(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a membership/key problem as the one message it is (it names the file and what to do)."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from ultrafedfm.secagg.errors import SecAggError

        try:
            return func(args)
        except (SecAggError, ValueError) as exc:
            print(f"error: {exc}")
            return 1

    return run


def add_kit_subcommands(kit_sub) -> None:
    enroll = kit_sub.add_parser("enroll", help="site: create the site's secure-aggregation key, print its fingerprint")
    enroll.add_argument("--kit", type=Path, required=True, help="the site's kit folder")
    enroll.set_defaults(func=_enroll)

    members = kit_sub.add_parser("members", help="site: show the member list, accept a changed key")
    members.add_argument("--kit", type=Path, required=True)
    members.add_argument("--accept-site", metavar="NAME", default=None, help="accept NAME's new key (after a phone check)")
    members.add_argument("--fingerprint", default=None, help="the new key's fingerprint, as that site read it to you")
    members.add_argument("--accept-admin", metavar="FINGERPRINT", default=None,
                         help="accept a new admin membership key (after a phone check with the admin)")
    members.set_defaults(func=_members)

    admin = kit_sub.add_parser("membership", help="project admin: the signed member list")
    admin_sub = admin.add_subparsers(dest="membership_command", metavar="ACTION", required=True)
    init = admin_sub.add_parser("init", help="create the membership key and an empty member list")
    init.add_argument("--consortium", type=Path, required=True)
    add = admin_sub.add_parser("add", help="enrol a site from its enrollment request")
    add.add_argument("--request", type=Path, required=True, help="the site's secagg_enrollment.json")
    add.add_argument("--fingerprint", required=True, help="the fingerprint the site's IT read to you out of band")
    add.add_argument("--replace", action="store_true", help="replace the key of a site already enrolled")
    remove = admin_sub.add_parser("remove", help="remove a site from the member list")
    remove.add_argument("--name", required=True)
    show = admin_sub.add_parser("show", help="print the member list")
    for sub, func in ((init, _admin_init), (add, _admin_add), (remove, _admin_remove), (show, _admin_show)):
        sub.add_argument("--workspace", type=Path, required=True, help="the provisioning workspace")
        sub.add_argument("--key", type=Path, default=None,
                         help="membership key file (default: WORKSPACE/membership/membership_admin_key.pem)")
        sub.set_defaults(func=func)


@_explained
def _enroll(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.enroll import enroll_site

    result = enroll_site(args.kit)
    print("\n".join(result.lines))
    return 0


@_explained
def _members(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.enroll import SiteFiles, membership_check
    from ultrafedfm.kit.membership import read_member_list
    from ultrafedfm.kit.pins import PinStore

    files = SiteFiles.in_kit(args.kit)
    if args.accept_site or args.accept_admin:
        member_list = read_member_list(files.members)
        pins = PinStore(files.pins)
        if args.accept_admin:
            pins.accept_admin(member_list, fingerprint=args.accept_admin)
            print(f"accepted admin key {args.accept_admin}")
        if args.accept_site:
            if not args.fingerprint:
                print("--accept-site needs --fingerprint (the new key's fingerprint, as that site read it to you)")
                return 2
            pins.accept_member(member_list, name=args.accept_site, fingerprint=args.fingerprint)
            print(f"accepted the new key of {args.accept_site}")
    ok, lines = membership_check(args.kit)
    print("\n".join(lines))
    return 0 if ok else 1


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    from ultrafedfm.kit.membership import ADMIN_KEY_FILE, MEMBERS_FILE

    folder = args.workspace / MEMBERSHIP_DIR
    return args.key or folder / ADMIN_KEY_FILE, folder / MEMBERS_FILE


def _print_list(member_list, members_path: Path) -> None:
    from ultrafedfm.secagg.signing import format_fingerprint

    print(f"{members_path}: member list v{member_list.version} of '{member_list.consortium}', admin key "
          f"{format_fingerprint(member_list.admin_fingerprint)}")
    for m in member_list.members:
        print(f"  {m.name:24s} {format_fingerprint(m.fingerprint)}")


@_explained
def _admin_init(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.consortium import load_consortium
    from ultrafedfm.kit.membership import init_membership, read_member_list

    config = load_consortium(args.consortium)
    key_path, _ = _paths(args)
    key_path, members_path = init_membership(args.workspace / MEMBERSHIP_DIR, consortium=config.name,
                                             server=config.server.host, key_path=key_path)
    _print_list(read_member_list(members_path), members_path)
    print(f"membership key: {key_path} (0600). Whoever holds it can add members: keep it offline if you can.")
    print("Give every site and the server this admin key fingerprint by a second channel.")
    return 0


def _distribute(members_path: Path) -> None:
    print(f"Send {members_path} to every site and the server for their kit's local/ folder.")


@_explained
def _admin_add(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.membership import (
        EnrollmentRequest, add_member, load_admin_key, read_member_list, write_member_list,
    )

    key_path, members_path = _paths(args)
    updated = add_member(read_member_list(members_path), EnrollmentRequest.read(args.request),
                         confirmed_fingerprint=args.fingerprint, admin_key=load_admin_key(key_path),
                         replace_key=args.replace)
    write_member_list(members_path, updated)
    _print_list(updated, members_path)
    _distribute(members_path)
    return 0


@_explained
def _admin_remove(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.membership import load_admin_key, read_member_list, remove_member, write_member_list

    key_path, members_path = _paths(args)
    updated = remove_member(read_member_list(members_path), args.name, admin_key=load_admin_key(key_path))
    write_member_list(members_path, updated)
    _print_list(updated, members_path)
    _distribute(members_path)
    return 0


@_explained
def _admin_show(args: argparse.Namespace) -> int:
    from ultrafedfm.kit.membership import read_member_list

    _, members_path = _paths(args)
    _print_list(read_member_list(members_path), members_path)
    return 0
