"""`edgefed certs`: the fleet's CA and certificates, enrollment tokens and API keys.

    edgefed certs init --tls-dir DIR [--host H ...]      CA + the coordinator's certificate
    edgefed certs node NAME --tls-dir DIR [--out DIR]    a node's certificate directory (its --tls-dir)
    edgefed certs coordinator --tls-dir DIR [--host H]   re-issue the coordinator's certificate
    edgefed certs token --state DIR [--uses N]           an enrollment token (shown once)
    edgefed certs api-key --state DIR [--admin]          a user (or admin) API key (shown once)
    edgefed certs list --state DIR / revoke ID --state DIR
    edgefed certs revoke-node NAME --state DIR           refuse the node's certificates issued so far
    edgefed certs show DIR_OR_PEM                        name, SubjectAltNames, issuer, validity
"""

from __future__ import annotations

import argparse
import json
import sys

from edgefed.args import positive_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("certs", help="fleet CA and certificates, enrollment tokens, API keys")
    ops = p.add_subparsers(dest="certs_command", required=True)

    q = ops.add_parser("init", help="create the CA and the coordinator's certificate")
    q.add_argument("--tls-dir", required=True, help="the coordinator's TLS directory (created)")
    q.add_argument("--host", action="append", metavar="HOST",
                   help="an IP address or DNS name nodes dial the coordinator at (repeatable; "
                        "default 127.0.0.1 and localhost)")
    _days(q)
    q.add_argument("--ca-days", type=positive_float, default=3650, help="the CA's lifetime (default 3650)")
    q.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every node certificate)")
    q.set_defaults(run=_init)

    q = ops.add_parser("coordinator", help="re-issue the coordinator's certificate from the existing CA")
    q.add_argument("--tls-dir", required=True)
    q.add_argument("--host", action="append", metavar="HOST")
    _days(q)
    q.set_defaults(run=_coordinator)

    q = ops.add_parser("node", help="issue a node's certificate: a directory to copy to the device as its --tls-dir")
    q.add_argument("name", help="the node's name (lowercase letters, digits, '-', '.')")
    q.add_argument("--tls-dir", required=True, help="the coordinator's TLS directory (holds the CA)")
    q.add_argument("--out", help="output directory (default: TLS_DIR/nodes/NAME)")
    _days(q)
    q.add_argument("--force", action="store_true", help="replace a certificate already in --out")
    q.set_defaults(run=_node)

    q = ops.add_parser("token", help="mint an enrollment token (a node needs one to register the first time)")
    _secret_args(q)
    q.add_argument("--uses", type=positive_int, help="registrations it allows (default: unlimited until it expires)")
    q.set_defaults(run=_token, ttl_default=24.0)

    q = ops.add_parser("api-key", help="mint an API key for the coordinator's HTTP API (Bearer)")
    _secret_args(q)
    q.add_argument("--admin", action="store_true", help="an admin key (deploy and other admin calls)")
    q.set_defaults(run=_api_key, ttl_default=None)

    q = ops.add_parser("list", help="list tokens and keys (never the secrets)")
    q.add_argument("--state", required=True, help="the coordinator's state directory")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_list)

    q = ops.add_parser("revoke", help="revoke a token or key by its id")
    q.add_argument("id")
    q.add_argument("--state", required=True, help="the coordinator's state directory")
    q.set_defaults(run=_revoke)

    q = ops.add_parser("revoke-node", help="refuse every certificate of a node issued until now (a lost device)")
    q.add_argument("name")
    q.add_argument("--state", required=True, help="the coordinator's state directory")
    q.set_defaults(run=_revoke_node)

    q = ops.add_parser("show", help="show a certificate: a PEM file, or a TLS dir's node.pem / coordinator.pem")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_show)


def _days(q: argparse.ArgumentParser) -> None:
    q.add_argument("--days", type=positive_float, default=365, help="certificate lifetime in days (default 365)")


def _secret_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--state", required=True, help="the coordinator's state directory")
    q.add_argument("--label", default="", help="a note shown by `edgefed certs list`")
    q.add_argument("--ttl-hours", type=positive_float,
                   help="lifetime in hours (tokens: default 24; keys: default no expiry)")
    q.add_argument("--json", action="store_true")


def _print_files(files, as_json: bool) -> int:
    out = {"name": files.name, "dir": str(files.dir), "cert": str(files.cert), "key": str(files.key),
           "ca": str(files.ca), "not_after": files.not_after.isoformat()}
    if as_json:
        print(json.dumps(out))
    else:
        print(f"{files.name}: {files.cert} (key {files.key}), valid until {files.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def _init(args: argparse.Namespace) -> int:
    from coordinator.security import init_ca

    files = init_ca(args.tls_dir, args.host, days=args.days, ca_days=args.ca_days, force=args.force)
    print(f"created CA {files.ca}", file=sys.stderr)
    return _print_files(files, False)


def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.security import issue_coordinator_cert

    return _print_files(issue_coordinator_cert(args.tls_dir, args.host, days=args.days), False)


def _node(args: argparse.Namespace) -> int:
    from coordinator.security import issue_node_cert

    files = issue_node_cert(args.tls_dir, args.name, args.out, days=args.days, force=args.force)
    print(f"copy {files.dir} to the device and start it with --tls-dir", file=sys.stderr)
    return _print_files(files, False)


def _mint(args: argparse.Namespace, kind: str, **extra) -> int:
    from coordinator.security import SecretStore

    ttl = args.ttl_hours if args.ttl_hours is not None else args.ttl_default
    rec, secret = SecretStore(args.state).create(kind, args.label, None if ttl is None else ttl * 3600, **extra)
    if args.json:
        print(json.dumps({"secret": secret, **rec.public()}))
    else:
        print(f"{kind} {rec.id} (shown once; only its hash is stored)", file=sys.stderr)
        print(secret)
    return 0


def _token(args: argparse.Namespace) -> int:
    return _mint(args, "enroll", uses=args.uses)


def _api_key(args: argparse.Namespace) -> int:
    return _mint(args, "admin" if args.admin else "api")


def _list(args: argparse.Namespace) -> int:
    from coordinator.security import SecretStore

    store = SecretStore(args.state)
    records = [r.public() for r in store.list()]
    revoked = store.revoked_nodes()
    if args.json:
        print(json.dumps({"secrets": records, "revoked_nodes": revoked}))
        return 0
    for r in records:
        state = "revoked" if r["revoked"] else ("used up" if r["uses_left"] == 0 else "active")
        print(f"{r['id']}  {r['kind']:<6}  {state:<7}  used {r['used']}  {r['label']}")
    for name, when in sorted(revoked.items()):
        print(f"node {name}: certificates issued until {_utc(when)} revoked")
    return 0


def _utc(t: float) -> str:
    import datetime as dt

    return f"{dt.datetime.fromtimestamp(t, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _revoke_node(args: argparse.Namespace) -> int:
    from coordinator.security import SecretStore

    when = SecretStore(args.state).revoke_node(args.name)
    print(f"node {args.name}: certificates issued until {_utc(when)} are refused; issue a new one with "
          f"`edgefed certs node {args.name} --force` to let it back", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from coordinator.security import describe_certificate

    info = describe_certificate(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from coordinator.security import SecretStore

    rec = SecretStore(args.state).revoke(args.id)
    print(f"revoked {rec.kind} {rec.id}", file=sys.stderr)
    return 0
