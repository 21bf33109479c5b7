"""`difflens store verify|repair DIR`: check every unit of a store; set damaged units aside."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("store", help="check a store (verify) or set its damaged units aside (repair)",
                       description="Integrity tools for an activation store. `verify` re-hashes every file and names "
                       "each damaged unit; `repair` restores manifest fields from the shards and moves damaged units "
                       "to quarantine/ so `difflens harvest --resume` (same settings) regenerates them exactly.")
    ssub = p.add_subparsers(dest="store_cmd", metavar="<command>")
    v = ssub.add_parser("verify", help="re-hash every file of every unit; exit 1 naming each damaged unit")
    v.add_argument("store", metavar="DIR")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=run_verify)
    r = ssub.add_parser("repair", help="restore the manifest from the shards; move damaged units to quarantine/")
    r.add_argument("store", metavar="DIR")
    r.add_argument("--dry-run", action="store_true", help="report what would be done; change nothing")
    r.set_defaults(func=run_repair)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_verify(args) -> int:
    from difflens.store import Store

    store = Store(args.store)
    bad = store.check_units()
    if args.json:
        print(json.dumps({"store": args.store, "units": len(store.records), "damaged_units": bad}, indent=2))
    if not bad:
        if not args.json:
            rows = {s: store.num_rows(s) for s in store.sites}
            print(f"store {args.store}: {len(store.records)} units verified, rows {rows}, fingerprint {store.fingerprint()}")
        return 0
    if not args.json:
        for unit, problems in bad.items():
            for msg in problems:
                print(f"{unit}: {msg}")
        print(f"store {args.store}: {len(bad)} of {len(store.records)} units damaged. Fix: difflens store repair "
              f"{args.store}, then re-run the harvest with --resume and the same settings")
    return 1


def run_repair(args) -> int:
    from difflens.store.repair import repair

    res = repair(args.store, dry_run=args.dry_run)
    verb = "would" if args.dry_run else "did"
    for fix in res["manifest_fixes"]:
        print(f"manifest: {verb} restore {fix} (all shards agree)")
    for unit, problems in res["damaged_units"].items():
        print(f"{unit}: {problems[0]}")
    if res["set_aside"]:
        print(f"moved {len(res['set_aside'])} files of {len(res['damaged_units'])} damaged units to "
              f"{args.store}/quarantine/ (nothing deleted)")
    if res["damaged_units"] and not args.dry_run:
        print(f"next: difflens harvest --resume --out {args.store} with the original settings regenerates them")
    elif not res["damaged_units"] and not res["manifest_fixes"]:
        print(f"store {args.store}: nothing to repair ({res['units_ok']} units verified)")
    return 0
