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
#
# This runs on every sandbox's start path, beside the sandbox's own start on a small
# machine: it forks as little as it can (bash builtins for waits, probes and times).
set -euo pipefail
CONF=/etc/egress
LOG=/var/log/egress
started=$EPOCHREALTIME
# Milliseconds since the start, into the variable named $1 (no fork).
mark() {
  local now=$EPOCHREALTIME
  printf -v "$1" '%d' $(((${now/./} - ${started/./}) / 1000))
}
# shellcheck source=/dev/null
. "$CONF/env"
# `connected` is not removed: it names a generation, and the host writes it before the
# start when the network was joined at creation. A restarted container keeps its files: a
# stale pid file stops squid from starting.
rm -f "$LOG/ready" "$LOG/filtering" /run/squid/squid.pid /run/dnsmasq/dnsmasq.pid \
  /run/ulog/ulogd.pid
# The rules first: the container forwards (ip_forward is on from its start), so nothing may
# reach the sandbox's network before they hold. The host connects that network only once
# this file names our generation, so no packet of the sandbox is ever forwarded unfiltered
# (a live policy change restarts the gateway with its sandbox running). Written in place:
# the host waits for the whole generation, so a partial read only makes it look again.
nft -f "$CONF/gw.nft"
echo "$GENERATION" >"$LOG/filtering"
mark t_rules

umask 022
# The log folder stays the host user's: files made here, each owned by its daemon.
for file in access.log cache.log dns.log packets.json ulogd.log; do : >>"$LOG/$file"; done
chown proxy:proxy "$LOG/access.log" "$LOG/cache.log"
chown dnsmasq "$LOG/dns.log"
chmod 0644 "$LOG/access.log" "$LOG/cache.log" "$LOG/dns.log" "$LOG/packets.json" "$LOG/ulogd.log"

# A wait of 10 ms without forking `sleep`: a read from a pipe nobody writes to.
exec {idle}<> <(:)
pause() {
  read -r -t 0.01 -u "$idle" _ || true
}
# Whether something listens on 127.0.0.1:$1 (a connection opened and closed, no fork).
listening() {
  local fd
  { exec {fd}<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  exec {fd}>&-
}

squid_pid=""
start_squid() {
  # squid listens on every address: it starts while the host connects the sandbox's network.
  squid -f "$CONF/squid.conf" -N &
  squid_pid=$!
}
trap '[ -z "$squid_pid" ] || { kill -TERM "$squid_pid" 2>/dev/null; wait "$squid_pid"; }; exit 0' \
  TERM INT
# squid takes longest to listen: it starts first, unless it needs the credentials broker
# (started by the host in this network namespace once this container runs), which must
# listen before squid starts: squid would take a parent that refused its first connection
# for dead.
if [ -z "${BROKER_PORT:-}" ]; then start_squid; fi
ulogd -d -c "$CONF/ulogd.conf"
dnsmasq --conf-file="$CONF/dnsmasq.conf" # bind-dynamic: it takes the sandbox's side later
if [ -n "${BROKER_PORT:-}" ]; then
  for ((i = 0; i < 3000; i++)); do
    if listening "$BROKER_PORT"; then break; fi
    pause
  done
  if ! listening "$BROKER_PORT"; then
    echo "egress-gateway: the credentials broker is not listening on $BROKER_PORT" >&2
    exit 1
  fi
  start_squid
fi
mark t_daemons

# The host writes our generation to `connected` once the sandbox's network is connected
# (the engine has set this container's routes by then: ours below replace them).
connected() {
  local said=""
  read -r said 2>/dev/null <"$LOG/connected" || true
  [ "$said" = "$GENERATION" ]
}
for ((i = 0; i < 3000; i++)); do
  if connected; then break; fi
  pause
done
internal_if=""
while read -r _ name _; do
  internal_if=$name
done < <(ip -o -4 addr show to "$GW_INT_IP/32")
if [ -z "$internal_if" ]; then
  echo "egress-gateway: no interface holds $GW_INT_IP (the sandbox's network is not connected)" >&2
  exit 1
fi
routes="addr replace $VGW/32 dev $internal_if"
if [ -n "${EGRESS_ROUTER:-}" ]; then routes+=$'\n'"route replace default via $EGRESS_ROUTER"; fi
ip -batch - <<<"$routes"
mark t_claimed

for ((i = 0; i < 1000; i++)); do
  if listening 3128 && listening 3129 && listening 3130 && listening 53; then
    echo "$GENERATION" >"$LOG/ready"
    mark t_ready
    echo "egress-gateway ready in $t_ready ms (rules $t_rules, daemons $t_daemons," \
      "claimed $t_claimed; generation $GENERATION, interface $internal_if, claimed $VGW)"
    wait "$squid_pid"
    echo "egress-gateway: squid exited" >&2
    exit 1
  fi
  if ! kill -0 "$squid_pid" 2>/dev/null; then break; fi
  pause
done
echo "egress-gateway: squid did not start; its log:" >&2
tail -n 20 "$LOG/cache.log" >&2 || true
exit 1
