"""The credentials broker's cost: an HTTPS request that carries a secret, beside the same
request to the same server under the plain egress policy (issue 26).

Two sandboxes of the basic image: `plain` allows the server (allowlist; its TLS spliced
end to end by the gateway), `brokered` uses a secret bound to it (the gateway sends the
connection to the broker, which terminates TLS, sets `Authorization: Bearer <value>` and
opens its own verified connection). The server is this benchmark's HTTPS stand-in on the
host (0.0.0.0, through the bridge gateway). Figures, from curl's own timers inside the
sandbox (a new connection each; samples alternate A B ... B A):

- time to first byte of a small GET: the broker's added latency per request. Both clients
  read a trust bundle of the same size (the image's, plus the broker's or the stand-in's
  CA): OpenSSL 3 takes tens of milliseconds to load a full bundle, and the broker's work
  (its own verified connection upstream, a certificate for the host) overlaps that load;
- a 10 MB download, from its first byte to its last: the broker's throughput against the
  spliced path (the broker decrypts and encrypts again every byte);
- the broker container's CPU time per brokered download (its cgroup's counter around the
  downloads; it is idle during the plain ones), beside the spliced download's duration:
  the broker is one Python thread, so its CPU per download bounds its throughput.

    python benchmarks/credentials.py [--runs N]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, abba_ms, count_option, report, standin_certificates
from egress import BIG_BYTES, host_server

from stigmer_sandbox import config, engine
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.runtime.egress_gateway import bridge_gateway

LABEL = {"com.stigmer.sandbox.test": "credentials-benchmark"}
TOKEN_VARIABLE = "STIGMER_BENCH_TOKEN"


def curl_ms(box: Sandbox, url: str, field: str, cacert: str) -> float:
    """curl's timer `field` in ms; "transfer": from the first byte to the last."""
    flags = f"--cacert {cacert}" if cacert else ""
    shown = "%{time_total} %{time_starttransfer}" if field == "transfer" else f"%{{{field}}}"
    result = box.exec(f"curl -sS {flags} -o /dev/null -w '{shown}' {url}", timeout=60)
    try:
        numbers = [float(part) for part in result.stdout.split()]
        return (numbers[0] - numbers[-1] if field == "transfer" else numbers[0]) * 1000
    except (ValueError, IndexError):  # curl failed: it printed no timers
        why = result.error or f"exit {result.exit_code}"  # error: the result was lost
        tail = (result.stderr or result.stdout or why).strip()[-300:]
        raise SystemExit(f"curl failed in {box.name}: {tail}") from None


def broker_cpu_ms(box: Sandbox) -> float:
    """CPU time the sandbox's broker container has used so far, in ms."""
    container = engine.client().containers.get(f"{box.name}-egress-broker")
    return float(container.stats(stream=False)["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e6


def main() -> None:
    runs = count_option(__doc__ or "", "runs", 30, "samples per path")
    folder = Path(tempfile.mkdtemp(prefix="credentials-bench-"))
    folder.chmod(0o755)
    bridge = bridge_gateway()
    standin_certificates(folder, [], [bridge])
    port = host_server(folder)
    entry, url = f"{bridge}:{port}", f"https://{bridge}:{port}"
    os.environ[TOKEN_VARIABLE] = "benchmark-token-value"
    base = config.load_settings(ROOT)
    secrets = {
        "TOKEN": {
            "from_env": TOKEN_VARIABLE,
            "hosts": [entry],
            "header": "Authorization: Bearer {value}",
            "ca": str(folder / "ca.pem"),
        }
    }
    chosen = {
        "plain": base.replace(egress="allowlist", allow=entry),
        "brokered": base.replace(egress="allowlist", secrets=secrets, use_secrets="TOKEN"),
    }
    boxes: dict[str, Sandbox] = {}
    try:
        for name, settings in chosen.items():
            state = {k: str(folder / name / k) for k in ("workspace", "logs", "state_dir")}
            boxes[name] = Sandbox.create_ephemeral(settings.replace(**state), extra_labels=LABEL)
            boxes[name].up()
        # The brokered sandbox trusts the broker (the image's bundle plus the broker CA),
        # and the broker the stand-in (the secret's `ca`); the plain one trusts the image's
        # bundle plus the stand-in's CA: both clients load a bundle of the same size
        # (OpenSSL 3 takes tens of milliseconds to read a full one, on either path).
        shutil.copy(folder / "ca.pem", folder / "plain" / "workspace" / "ca.pem")
        boxes["plain"].exec("cat /etc/ssl/certs/ca-certificates.crt ca.pem > bundle.pem")
        cacert = {"plain": "/workspace/bundle.pem", "brokered": ""}
        samples: dict[str, dict[str, list[float]]] = {}

        def sampler(name: str, path: str, field: str) -> Callable[[], None]:
            def sample() -> None:
                figure = curl_ms(boxes[name], f"{url}{path}", field, cacert[name])
                samples.setdefault(field, {}).setdefault(name, []).append(figure)

            return sample

        abba_ms({n: sampler(n, "/", "time_starttransfer") for n in boxes}, runs)
        big_runs = max(4, runs // 3)
        cpu_before = broker_cpu_ms(boxes["brokered"])
        abba_ms({n: sampler(n, "/big", "transfer") for n in boxes}, big_runs)
        # abba_ms makes one untimed call per block: two per path besides the timed ones.
        broker_cpu = (broker_cpu_ms(boxes["brokered"]) - cpu_before) / (big_runs + 2)
        ttfb = {n: statistics.median(v) for n, v in samples["time_starttransfer"].items()}
        total = {n: statistics.median(v) for n, v in samples["transfer"].items()}
        report(
            "credentials: HTTPS request with a secret added by the broker, ttfb",
            ttfb["brokered"],
            "the same request under the plain egress policy (spliced)",
            ttfb["plain"],
            "ms",
        )
        report(
            "credentials: latency the broker adds per request (new connection)",
            ttfb["brokered"] - ttfb["plain"],
            "plain ttfb",
            ttfb["plain"],
            "ms",
            goal="<= 5",
        )
        mb = BIG_BYTES / 1e6
        report(
            "credentials: 10 MB download through the broker (first byte to last), MB/s",
            mb / (total["brokered"] / 1000),
            "the same download spliced, MB/s",
            mb / (total["plain"] / 1000),
            "MB/s",
            goal=f">= {0.8 * mb / (total['plain'] / 1000):.0f}",
        )
        report(
            "credentials: broker CPU per 10 MB download (incl. its two handshakes), ms",
            broker_cpu,
            "the same download spliced, first byte to last",
            total["plain"],
            "ms",
        )
    finally:
        for box in boxes.values():
            box.remove()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
