"""The egress gateway's cost: network paths and container start, each beside `open`.

- Time to first byte of an HTTPS GET (a new connection each, curl's own
  `time_starttransfer` inside the container, so `docker exec` is not counted) and a 10 MB
  HTTPS download, from a server this benchmark runs on the host (0.0.0.0, reached through
  the default bridge's gateway, explicitly allowed by an entry since it is a private
  address). Paths: `open` (a container on the default bridge, no gateway: the baseline),
  `public` and `allowlist` through the explicit proxy (HTTPS_PROXY, what tools use), and
  `public` with the proxy variables unset (routed through the gateway's filter). Samples
  alternate A B ... B A.
- Start: a container of the basic image started with its gateway (network, gateway,
  container) beside the same container on the default bridge; and started on a gateway
  that is already up (what a warm pool of gateways would give).
- The library's start: `Sandbox.create_ephemeral(...).up()` and its first command, under
  `public` with a fresh gateway, and with `egress_spares: 1` (a spare gateway ready, taken
  by name), beside the same under `open`. Removal is not timed, nor the start of the
  spare a start asked for (each start waits for it: none runs in the background).

    python benchmarks/egress.py [--runs N] [--part all|paths|start|library]

`--part` runs one part only (`paths`: the network paths; `start`: the container start;
`library`: the library's start), e.g. to measure a change to the start alone.
"""

from __future__ import annotations

import argparse
import http.server
import socketserver
import ssl
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, abba_ms, report, standin_certificates, timed

from stigmer_sandbox import config, egress, engine
from stigmer_sandbox.runtime import Sandbox, egress_spares
from stigmer_sandbox.runtime.egress_gateway import EgressGateway, bridge_gateway

BASIC = "stigmer-sandbox-basic:local"
BIG_BYTES = 10 * 1024 * 1024
LABEL = {"com.stigmer.sandbox.test": "egress-benchmark"}
CA = "/etc/egress-bench/ca.pem"


def host_server(folder: Path) -> int:
    """An HTTPS server on 0.0.0.0 serving / (small) and /big (10 MB); its port."""
    (folder / "www").mkdir()
    (folder / "www" / "index.html").write_text("hello\n")
    (folder / "www" / "big").write_bytes(b"\0" * BIG_BYTES)

    class Handler(http.server.SimpleHTTPRequestHandler):
        disable_nagle_algorithm = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder / "www"), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("0.0.0.0", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "srv.pem", folder / "srv.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


def client(name: str, folder: Path, **options: Any) -> Any:
    return engine.client().containers.run(
        BASIC,
        ["sleep", "infinity"],
        name=name,
        detach=True,
        user="1000:1000",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        labels=LABEL,
        volumes={str(folder / "ca.pem"): {"bind": CA, "mode": "ro"}},
        **options,
    )


def curl_seconds(container: Any, url: str, proxied: bool, field: str) -> float:
    unset = "" if proxied else "env -u HTTPS_PROXY -u https_proxy "
    command = f"{unset}curl -sS --cacert {CA} -o /dev/null -w '%{{{field}}}' {url}"
    result = container.exec_run(["bash", "-c", command], user="1000:1000")
    text = result.output.decode().strip()
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"curl failed in {container.name}: {text[-300:]}") from None


PARTS = ("all", "paths", "start", "library")


def options() -> tuple[int, str]:
    """--runs and --part."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="samples per path (default: 30)")
    parser.add_argument(
        "--part", choices=PARTS, default="all", help="run one part only (default: all)"
    )
    found = parser.parse_args()
    return int(found.runs), str(found.part)


def main() -> None:
    runs, part = options()
    settings = config.load_settings(ROOT)
    run_id = uuid.uuid4().hex[:8]
    folder = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    folder.chmod(0o755)
    bridge = bridge_gateway()
    standin_certificates(folder, [], [bridge])
    port = host_server(folder)
    entry = f"{bridge}:{port}"
    url = f"https://{bridge}:{port}"
    gateways: list[EgressGateway] = []
    containers: list[Any] = []
    try:
        if part in ("all", "paths"):
            path_figures(settings, folder, url, entry, runs, made=(run_id, gateways, containers))
        if part in ("all", "start"):
            start_figures(settings, folder, run_id, max(3, runs // 6))
        if part in ("all", "library"):
            library_start_figures(settings, folder, max(3, runs // 6))
    finally:
        for container in containers:
            container.remove(force=True)
        for gateway in gateways:
            gateway.down(purge_logs=True)


def path_figures(
    settings: Any,
    folder: Path,
    url: str,
    entry: str,
    runs: int,
    *,
    made: tuple[str, list[EgressGateway], list[Any]],
) -> None:
    """Time to first byte and a 10 MB download through each path, beside `open`. `made`:
    the run's id, and the lists the gateways and containers made go in (the caller removes
    them, whatever happens here)."""
    run_id, gateways, containers = made
    paths: dict[str, tuple[Any, bool]] = {}
    containers.append(client(f"egress-bench-open-{run_id}", folder))
    paths["open"] = (containers[-1], True)
    for mode in ("public", "allowlist"):
        policy = egress.EgressPolicy.from_options(mode, allow=[entry])
        gateway = EgressGateway(
            settings, f"egress-bench-{mode}-{run_id}", policy, extra_labels=LABEL
        )
        gateway.up()
        gateways.append(gateway)
        options = gateway.sandbox_options()
        containers.append(client(f"egress-bench-{mode}-{run_id}", folder, **options))
        paths[f"{mode} via proxy"] = (containers[-1], True)
    paths["public routed"] = (containers[1], False)

    def sampler(name: str, path: str, field: str):
        container, proxied = paths[name]
        return lambda: samples[field][name].append(
            curl_seconds(container, f"{url}{path}", proxied, field) * 1000
        )

    samples: dict[str, dict[str, list[float]]] = {
        "time_starttransfer": {name: [] for name in paths},
        "time_total": {name: [] for name in paths},
    }
    abba_ms({n: sampler(n, "/", "time_starttransfer") for n in paths}, runs)
    abba_ms({n: sampler(n, "/big", "time_total") for n in paths}, max(4, runs // 3))
    ttfb = {n: statistics.median(v) for n, v in samples["time_starttransfer"].items()}
    total = {n: statistics.median(v) for n, v in samples["time_total"].items()}
    for name in paths:
        if name == "open":
            continue
        report(f"egress https ttfb {name}", ttfb[name], "open", ttfb["open"], "ms", goal="")
        report(
            f"egress https ttfb added {name}",
            ttfb[name] - ttfb["open"],
            "open ttfb",
            ttfb["open"],
            "ms",
            goal="<= 5",
        )
        report(
            f"egress 10 MB download {name}",
            total[name],
            "open",
            total["open"],
            "ms",
            goal=f"<= {1.2 * total['open']:.1f}",
        )


def start_figures(settings: Any, folder: Path, run_id: str, runs: int) -> None:
    """Container start with a gateway (cold: network and gateway too; warm: gateway up)."""
    policy = egress.EgressPolicy.from_options("public")
    warm = EgressGateway(settings, f"egress-bench-warm-{run_id}", policy, extra_labels=LABEL)
    warm.up()
    counter = iter(range(10**6))

    def plain() -> None:
        client(f"egress-bench-start-{run_id}-{next(counter)}", folder).remove(force=True)

    def cold() -> None:
        gateway = EgressGateway(
            settings, f"egress-bench-cold-{run_id}-{next(counter)}", policy, extra_labels=LABEL
        )
        try:
            gateway.up()
            name = f"egress-bench-start-{run_id}-{next(counter)}"
            client(name, folder, **gateway.sandbox_options()).remove(force=True)
        finally:
            gateway.down(purge_logs=True)

    def on_warm() -> None:
        name = f"egress-bench-start-{run_id}-{next(counter)}"
        client(name, folder, **warm.sandbox_options()).remove(force=True)

    try:
        times: dict[str, list[float]] = {"plain": [], "cold": [], "warm": []}
        actions = {"plain": plain, "cold": cold, "warm": on_warm}
        for name in [*actions, *reversed(actions)] * max(1, runs // 2):
            times[name].append(timed(actions[name]) * 1000)
        base = statistics.median(times["plain"])
        report(
            "egress start with its gateway (network, gateway, container)",
            statistics.median(times["cold"]),
            "container without gateway",
            base,
            "ms",
            goal=f"<= {1.3 * base:.0f}",
        )
        report(
            "egress start on a gateway already up",
            statistics.median(times["warm"]),
            "container without gateway",
            base,
            "ms",
            goal=f"<= {1.3 * base:.0f}",
        )
    finally:
        warm.down(purge_logs=True)
        wanted = {"name": f"egress-bench-start-{run_id}-"}
        for container in engine.client().containers.list(all=True, filters=wanted):
            container.remove(force=True)


def library_start_figures(settings: Any, folder: Path, runs: int) -> None:
    """`Sandbox.create_ephemeral(...).up()` plus one command: fresh gateway, spare, open."""
    state = {key: str(folder / f"lib-{key}") for key in ("workspace", "logs", "state_dir")}
    chosen = {
        "open": settings.replace(**state, egress="open"),
        "fresh": settings.replace(**state, egress="public"),
        "spare": settings.replace(**state, egress="public", egress_spares=1),
    }

    def started(name: str) -> Callable[[], float]:
        def action() -> float:
            # Untimed: the spare the previous start asked for is up before any start (a
            # gateway starting in the background would be timed with a fresh start).
            egress_spares.wait_started(60)
            began = time.perf_counter()
            box = Sandbox.create_ephemeral(chosen[name], extra_labels=LABEL)
            try:
                box.up()
                box.exec("true")
                return time.perf_counter() - began
            finally:
                box.remove()

        return action

    try:
        times: dict[str, list[float]] = {name: [] for name in chosen}
        for name in [*chosen, *reversed(chosen)] * max(1, runs // 2):
            times[name].append(started(name)() * 1000)
        base = statistics.median(times["open"])
        for name, figure in (("fresh", "a fresh gateway"), ("spare", "a spare gateway")):
            report(
                f"egress Sandbox start + first command with {figure}",
                statistics.median(times[name]),
                "the same under open",
                base,
                "ms",
                goal=f"<= {1.3 * base:.0f}",
            )
    finally:
        egress_spares.discard_all()


if __name__ == "__main__":
    main()
