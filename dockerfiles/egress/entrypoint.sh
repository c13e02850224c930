#!/bin/bash
# Start the egress gateway from the configuration mounted at /etc/egress (rendered by
# stigmer_sandbox/runtime/egress_gateway.py): gw.nft, squid.conf, dnsmasq.conf,
# ulogd.conf and env, which sets
#   GW_INT_IP      our address on the sandbox's network
#   VGW            that network's IPAM gateway address, which we claim (Docker gives the
#                  sandbox a default route through it: it leads here)
#   EGRESS_ROUTER  the default route out (the egress network's gateway)
#   GENERATION     written to /var/log/egress/filtering once the rules are loaded (the host
#                  connects the sandbox's network only then, and writes it to `connected`
#                  when done) and to /var/log/egress/ready once every daemon listens
#   BROKER_PORT    the credentials broker's port on 127.0.0.1 (empty: no secrets)
# Logs go to /var/log/egress (a host folder): access.log (squid), packets.json (ulogd),
# dns.log (dnsmasq). Exits non-zero, never announcing readiness, when a daemon fails.
set -euo pipefail
CONF=/etc/egress
LOG=/var/log/egress
started=$(date +%s%N)
# shellcheck source=/dev/null
. "$CONF/env"
rm -f "$LOG/ready" "$LOG/filtering" "$LOG/connected"
# The rules first: the container forwards (ip_forward is on from its start), so nothing may
# reach the sandbox's network before they hold. The host connects that network only once
# this file names our generation, so no packet of the sandbox is ever forwarded unfiltered
# (a live policy change restarts the gateway with its sandbox running).
nft -f "$CONF/gw.nft"
echo "$GENERATION" >"$LOG/filtering.tmp"
mv -f "$LOG/filtering.tmp" "$LOG/filtering"

umask 022
# A restarted container keeps its files: a stale pid file stops squid from starting.
rm -f /run/squid/squid.pid /run/dnsmasq/dnsmasq.pid /run/ulog/ulogd.pid
mkdir -p /run/squid
# The log folder stays the host user's: files made here, each owned by its daemon.
touch "$LOG/access.log" "$LOG/cache.log" "$LOG/dns.log" "$LOG/packets.json" "$LOG/ulogd.log"
chown proxy:proxy /run/squid "$LOG/access.log" "$LOG/cache.log"
chown dnsmasq "$LOG/dns.log"
chmod 0644 "$LOG/access.log" "$LOG/cache.log" "$LOG/dns.log" "$LOG/packets.json" "$LOG/ulogd.log"

listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ulogd -d -c "$CONF/ulogd.conf"
dnsmasq --conf-file="$CONF/dnsmasq.conf" # bind-dynamic: it takes the sandbox's side later
# With secrets, the credentials broker (started by the host in this network namespace
# once this container runs) listens before squid starts: squid would take a parent
# that refused its first connection for dead.
if [ -n "${BROKER_PORT:-}" ]; then
  for _ in $(seq 1 3000); do
    if listening "$BROKER_PORT"; then break; fi
    sleep 0.01
  done
  if ! listening "$BROKER_PORT"; then
    echo "egress-gateway: the credentials broker is not listening on $BROKER_PORT" >&2
    exit 1
  fi
fi
# squid listens on every address: it starts while the host connects the sandbox's network.
squid -f "$CONF/squid.conf" -N &
squid_pid=$!
trap 'kill -TERM "$squid_pid" 2>/dev/null; wait "$squid_pid"; exit 0' TERM INT

# The host writes our generation to `connected` once the sandbox's network is connected
# (the engine has set this container's routes by then: ours below replace them).
connected() {
  local said=""
  read -r said 2>/dev/null <"$LOG/connected" || true
  [ "$said" = "$GENERATION" ]
}
for _ in $(seq 1 3000); do
  if connected; then break; fi
  sleep 0.01
done
internal_if=$(ip -o -4 addr show | awk -v a="$GW_INT_IP/" 'index($4, a) == 1 {print $2; exit}')
if [ -z "$internal_if" ]; then
  echo "egress-gateway: no interface holds $GW_INT_IP (the sandbox's network is not connected)" >&2
  exit 1
fi
ip addr replace "$VGW/32" dev "$internal_if"
if [ -n "${EGRESS_ROUTER:-}" ]; then ip route replace default via "$EGRESS_ROUTER"; fi

for _ in $(seq 1 1000); do
  if listening 3128 && listening 3129 && listening 3130 && listening 53; then
    echo "$GENERATION" >"$LOG/ready.tmp"
    mv -f "$LOG/ready.tmp" "$LOG/ready"
    echo "egress-gateway ready in $(( ($(date +%s%N) - started) / 1000000 )) ms" \
      "(generation $GENERATION, interface $internal_if, claimed $VGW)"
    wait "$squid_pid"
    echo "egress-gateway: squid exited" >&2
    exit 1
  fi
  if ! kill -0 "$squid_pid" 2>/dev/null; then break; fi
  sleep 0.01
done
echo "egress-gateway: squid did not start; its log:" >&2
tail -n 20 "$LOG/cache.log" >&2 || true
exit 1
