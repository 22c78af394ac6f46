"""`hpcckpt catalog check|rebuild|info|pg-setup`: the catalog against the store, and its PostgreSQL setup."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.catalog import is_postgres_url, pg_security, pg_setup
from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.errors import UsageError
from hpcckpt.exitcodes import EXIT_CATALOG, EXIT_OK
from hpcckpt.store.access import has_catalog, target_users
from hpcckpt.store.check import check_consistency
from hpcckpt.store.rebuild import rebuild_catalog
from hpcckpt.store.site import Site

HELP = """\
Compare the catalog with the images in the store, or rebuild it from them.

  check     report every disagreement (committed image missing, image with
            no row, leftovers of dead writers) and what fixes it; exits 6
            when there is any
  rebuild   add a committed row for every image that has none, from the
            image's own header (same ckptid, job, node, parent); use it
            after losing or moving aside a damaged catalog.sqlite
  info      backend, location and schema version
  pg-setup  (admin) make a site PostgreSQL catalog ready: tables, per-user
            roles and row-level security; see 'hpcckpt catalog pg-setup -h'

examples:
  hpcckpt catalog check
  mv ~/.local/share/hpcckpt/store/$USER/catalog.sqlite{,.broken} && hpcckpt catalog rebuild
  hpcckpt catalog rebuild --verify --json     # read every image in full first
"""

PG_SETUP_HELP = """\
Make a site-wide PostgreSQL catalog ready for every user, as its admin.

Run as root: with a URL that names no user, root connects as the role
hpcckpt_admin (which must own the database and have CREATEROLE; peer
authentication maps root to it). It creates the tables or brings them to
this hpcckpt's schema version, turns on row-level security (each user's
role sees and changes only that user's rows, whatever client they use),
removes and adds the roles of the named Unix users, and prints the
pg_hba.conf and pg_ident.conf lines the server needs. Safe to re-run: after
an upgrade of hpcckpt, and whenever accounts come or go.

examples:
  # once, as the postgres superuser:
  #   createuser --login --createrole hpcckpt_admin && createdb --owner hpcckpt_admin hpcckpt
  hpcckpt catalog pg-setup --url 'postgresql:///hpcckpt?host=/run/postgresql' --all-users
  hpcckpt catalog pg-setup --url 'postgresql:///hpcckpt?host=/run/postgresql' --add-user alice --add-user bob
  hpcckpt catalog pg-setup --remove-user carol          # URL from $HPCCKPT_CATALOG or the site policy
  hpcckpt catalog pg-setup --json | jq -r .pg_ident     # the pg_ident.conf lines
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "catalog", help="check or rebuild the catalog", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = p.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    for name, text in (("check", "report where catalog and store disagree"),
                       ("rebuild", "re-create catalog rows from the images on disk"),
                       ("info", "show backend, location and schema version")):
        sp = csub.add_parser(name, help=text, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--user", metavar="NAME", help="(root) only this user")
        if name == "rebuild":
            sp.add_argument("--verify", action="store_true", help="verify every image in full, not only its header")
        add_store_args(sp)
        add_json_arg(sp)
        sp.set_defaults(func=run)
    _register_pg_setup(csub)


def _register_pg_setup(csub: Any) -> None:
    sp = csub.add_parser("pg-setup", help="(admin) set up a PostgreSQL catalog: tables, user roles, row security",
                         description=PG_SETUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--url", metavar="URL",
                    help="the catalog, postgresql://... (default: $HPCCKPT_CATALOG, or the policy's storage.catalog)")
    sp.add_argument("--add-user", metavar="NAME", action="append", default=[],
                    help="give Unix user NAME a catalog role (repeatable; uid from passwd)")
    sp.add_argument("--remove-user", metavar="NAME", action="append", default=[],
                    help="take NAME's catalog access away; their rows stay, for root (repeatable)")
    sp.add_argument("--all-users", action="store_true",
                    help="add every passwd account with uid >= --min-uid (not nobody)")
    sp.add_argument("--min-uid", metavar="UID", type=int, default=1000, help="lowest uid --all-users adds (1000)")
    sp.add_argument("--admin", metavar="NAME", action="append", default=[],
                    help="also map Unix user NAME to the admin role in the printed pg_ident.conf lines")
    sp.add_argument("--policy", metavar="FILE", help="user policy file (default: $HPCCKPT_POLICY)")
    add_json_arg(sp)
    sp.set_defaults(func=run_pg_setup)


def run_pg_setup(args: argparse.Namespace) -> int:
    url = args.url or Site.load(store=None, catalog=None, policy_file=args.policy).catalog_url
    if not url:
        raise UsageError("no catalog URL: give --url, or set $HPCCKPT_CATALOG or the policy's storage.catalog")
    if not is_postgres_url(url):
        raise UsageError(f"pg-setup is for PostgreSQL catalogs; {url!r} is not a postgresql:// URL",
                         hint="SQLite catalogs are per-user files and need no setup")
    accounts, skipped = pg_security.local_accounts(args.add_user, all_users=args.all_users, min_uid=args.min_uid)
    report = pg_setup.setup_catalog(url, current_user(), add=accounts, remove=args.remove_user,
                                       extra_admins=args.admin)
    if args.json:
        print_json(dict(report.to_dict(), skipped=skipped))
        return EXIT_OK
    migrated = f" (upgraded from {report.migrated_from})" if report.migrated_from is not None else ""
    lines = [f"catalog {report.location}: schema version {report.schema_version}{migrated}, "
             f"row-level security on, admin role {report.role}"]
    lines += [f"added {name} (uid {uid})" for name, uid in report.added]
    lines += [f"removed {name}" for name in report.removed]
    lines += [f"skipped {s['user']}: {s['reason']}" for s in skipped]
    lines.append(f"{len(report.users)} user(s) mapped: " + (", ".join(f"{n}={u}" for n, u in report.users) or "none"))
    lines.append("\npg_hba.conf (put it before any broader 'local' line, then reload the server):")
    lines += ["  " + line for line in report.hba.splitlines()]
    lines.append("pg_ident.conf:")
    lines += ["  " + line for line in report.ident.splitlines()]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    site = Site.load(store=args.store, catalog=args.catalog, policy_file=args.policy)
    docs: list[dict[str, Any]] = []
    rc = EXIT_OK
    for user in target_users(site.store_root, current_user(), args.user):
        if args.catalog_command != "rebuild" and not has_catalog(site, user):
            continue
        with site.opened(user) as (cat, store):
            if args.catalog_command == "check":
                findings = check_consistency(cat, store)
                if findings:
                    rc = EXIT_CATALOG
                doc: dict[str, Any] = {"user": user.name, "findings": [f.to_dict() for f in findings]}
                text = [f"{user.name}: {len(findings)} finding(s) in {cat.location}"]
                text += [f"  {f.kind:<18} {f.ckptid if f.ckptid is not None else '-':>8}  {f.path}: {f.detail}"
                         for f in findings]
            elif args.catalog_command == "rebuild":
                rep = rebuild_catalog(cat, store, verify=args.verify)
                doc = dict(rep.to_dict(), user=user.name)
                text = [f"{user.name}: added {len(rep.added)} row(s), {len(rep.present)} already present, "
                        f"{len(rep.skipped)} image(s) skipped ({cat.location})"]
                text += [f"  skipped {s['path']}: {s['reason']}" for s in rep.skipped]
            else:
                doc = dict(cat.describe(), schema_version=cat.schema_version(), store=str(store.user_dir))
                text = [f"{user.name}: {doc['backend']} catalog at {doc['location']}, "
                        f"schema version {doc['schema_version']}"]
        docs.append(doc)
        if not args.json:
            sys.stdout.write("\n".join(text) + "\n")
    if args.json:
        print_json(docs)
    return rc
