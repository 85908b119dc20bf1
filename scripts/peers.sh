#!/usr/bin/env bash
# Make sure the peers the test suite talks to are installed and running on loopback.
#   RabbitMQ 127.0.0.1:5672 (guest/guest), Mosquitto 127.0.0.1:1883, plus the client tools the
#   tests drive (mosquitto_pub, swaks, promtool). Installs with apt when missing and we are root;
#   otherwise says exactly what to run. Idempotent: does nothing when all is there.
set -euo pipefail

APT_PACKAGES=(rabbitmq-server mosquitto mosquitto-clients swaks libnet-ssleay-perl prometheus curl chromium chromium-driver gnupg openssl dovecot-imapd dovecot-pop3d prosody)
# `peers.sh --bench` (make bench): also the load generator and Node.js for the Node-RED baseline.
if [[ "${1:-}" == "--bench" ]]; then
  APT_PACKAGES+=(wrk)
  command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)  # a NodeSource nodejs brings its own npm
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- ; }

wait_port() { # port seconds name
  for _ in $(seq 1 "$(( $2 * 4 ))"); do port_open "$1" && return 0; sleep 0.25; done
  echo "peers: $3 did not open 127.0.0.1:$1 within $2 s" >&2; return 1
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "peers: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "peers: missing Debian packages: ${missing[*]}" >&2
    echo "       run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if ! port_open 5672; then
  echo "peers: starting RabbitMQ"
  if [[ $(id -u) -eq 0 ]]; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
  else
    echo "       run: sudo rabbitmq-server -detached" >&2; exit 1
  fi
  wait_port 5672 90 RabbitMQ
fi

if ! port_open 1883; then
  echo "peers: starting Mosquitto"
  if [[ $(id -u) -eq 0 ]]; then
    mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else
    echo "       run: sudo mosquitto -d -c /etc/mosquitto/mosquitto.conf" >&2; exit 1
  fi
  wait_port 1883 20 Mosquitto
fi
echo "peers: RabbitMQ 127.0.0.1:5672 and Mosquitto 127.0.0.1:1883 are up"
