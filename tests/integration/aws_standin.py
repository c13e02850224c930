"""An S3 (and IAM) stand-in for the AWS broker tests: moto in server mode over HTTPS.

Run as a program: `python aws_standin.py CERT_PEM` serves on 0.0.0.0 (reached from
sandboxes through the engine's bridge gateway), prints its port, and serves until killed.
Started with INITIAL_NO_AUTH_ACTION_COUNT=N in its environment, moto verifies every
SigV4 signature against the IAM keys it holds once N actions have run: the test's first
N calls make the user and its key, and from then on a request signed with anything but
that key is refused (InvalidAccessKeyId, SignatureDoesNotMatch).
"""

from __future__ import annotations

import ssl
import sys


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1])
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        "0.0.0.0",
        0,
        app,
        threaded=True,
        request_handler=MotoRequestHandler,  # keeps S3 metadata names with '_'
        ssl_context=context,
    )
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
