"""``gazsi certs create``: a CA plus server and client certificates for one deployment.

The files go to ``--out`` (default ``<data_dir>/tls``); point ``edge.tls`` / ``gateway.tls``
at ``server.crt``/``server.key`` and give clients ``ca.crt``. Running it again reuses the CA.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    certs = sub.add_parser("certs", help="create a CA and TLS certificates for a deployment")
    act = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    create = act.add_parser("create", help="write ca.crt/key, server.crt/key and <client>.crt/key")
    create.add_argument("--out", help="output directory (default: <data_dir>/tls)")
    create.add_argument(
        "--host", action="append", default=[],
        help="DNS name or IP the server certificate covers (repeatable; default: localhost, 127.0.0.1)",
    )
    create.add_argument("--client", action="append", default=[], help="client certificate name (repeatable)")
    create.add_argument("--days", type=int, default=365, help="validity of server/client certificates")
    create.add_argument("--force", action="store_true", help="replace an existing server certificate")
    create.set_defaults(handler=_create)


def _create(args: argparse.Namespace) -> int:
    from gazsi_cluster.config import load_settings
    from gazsi_cluster.tls import create_deployment_certs

    out = Path(args.out) if args.out else load_settings(args.config).data_dir / "tls"
    hosts = args.host or ["localhost", "127.0.0.1"]
    paths = create_deployment_certs(out, hosts=hosts, clients=args.client, days=args.days, overwrite=args.force)
    print(f"CA:     {paths.ca_cert}")
    print(f"server: {paths.server_cert} (key {paths.server_key}) for {', '.join(hosts)}")
    for name, (cert, key) in paths.clients.items():
        print(f"client: {cert} (key {key}) CN={name}")
    print("serve with: GAZSI_EDGE__TLS__CERTFILE=… GAZSI_EDGE__TLS__KEYFILE=… (or gateway.tls)")
    return 0
