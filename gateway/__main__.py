"""``python -m gateway``: print the Envoy bootstrap of an Inference Gateway in front of kvpick.

Example: ``python -m gateway --listen-port 8081 --epp-port 9002 > envoy.yaml`` and then
``envoy -c envoy.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from gateway.envoy_config import GatewayConfig, render

_MODES = ("FULL_DUPLEX_STREAMED", "BUFFERED")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--listen-port", type=int, default=8081, help="client port (default 8081)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin (default 9901)")
    p.add_argument("--epp-host", default="127.0.0.1", help="EPP address (default 127.0.0.1)")
    p.add_argument("--epp-port", type=int, default=9002, help="EPP ext_proc port (default 9002)")
    p.add_argument("--epp-plaintext", action="store_true", help="no TLS to the EPP")
    p.add_argument("--body-mode", choices=_MODES, default=_MODES[0], help="ext_proc body mode")
    p.add_argument(
        "--metadata-routing",
        action="store_true",
        help="route on the envoy.lb dynamic metadata instead of the destination header",
    )
    p.add_argument(
        "--fail-open",
        action="store_true",
        help="failure_mode_allow: pass requests if the EPP is down",
    )
    p.add_argument(
        "--epp-client-cert",
        metavar="FILE",
        help="client certificate Envoy presents to the EPP (mutual TLS; with --epp-client-key)",
    )
    p.add_argument("--epp-client-key", metavar="FILE", help="private key of --epp-client-cert")
    p.add_argument(
        "--epp-ca",
        metavar="FILE",
        help="CA bundle to verify the EPP's certificate against (default: not verified)",
    )
    p.add_argument(
        "--epp-server-name",
        metavar="NAME",
        help="SNI sent to the EPP; with --epp-ca, a DNS name its certificate must hold",
    )
    args = p.parse_args(argv)
    try:
        cfg = _config(args)
    except ValueError as exc:
        p.error(str(exc))
    sys.stdout.write(render(cfg))
    return 0


def _config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        epp_host=args.epp_host,
        epp_port=args.epp_port,
        epp_tls=not args.epp_plaintext,
        request_body_mode=args.body_mode,
        response_body_mode=args.body_mode,
        metadata_routing=args.metadata_routing,
        failure_mode_allow=args.fail_open,
        epp_client_cert=args.epp_client_cert,
        epp_client_key=args.epp_client_key,
        epp_ca=args.epp_ca,
        epp_server_name=args.epp_server_name,
    )


if __name__ == "__main__":
    sys.exit(main())
