"""`hpcckpt catalog check|rebuild|info`: the catalog against the store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hpcckpt.catalog.access import has_catalog, load_setup, opened, target_users
from hpcckpt.catalog.check import check_consistency
from hpcckpt.catalog.rebuild import rebuild_catalog
from hpcckpt.cli.common import add_json_arg, add_store_args, print_json
from hpcckpt.context import current_user
from hpcckpt.errors import EXIT_CATALOG, EXIT_OK

HELP = """\
Compare the catalog with the images in the store, or rebuild it from them.

  check     report every disagreement (committed image missing, image with
            no row, leftovers of dead writers) and what fixes it; exits 6
            when there is any
  rebuild   add a committed row for every image that has none, from the
            image's own header (same ckptid, job, node, parent); use it
            after losing or moving aside a damaged catalog.sqlite
  info      backend, location and schema version

examples:
  hpcckpt catalog check
  mv ~/.local/share/hpcckpt/store/$USER/catalog.sqlite{,.broken} && hpcckpt catalog rebuild
  hpcckpt catalog rebuild --verify --json     # read every image in full first
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


def run(args: argparse.Namespace) -> int:
    setup = load_setup(args.store, args.catalog, args.policy)
    docs: list[dict[str, Any]] = []
    rc = EXIT_OK
    for user in target_users(setup.store_root, current_user(), args.user):
        if args.catalog_command != "rebuild" and not has_catalog(setup, user):
            continue
        with opened(setup, user) as (cat, store):
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
