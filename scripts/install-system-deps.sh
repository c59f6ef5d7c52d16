#!/usr/bin/env bash
# Debian packages the tests use for real (not mocks): Prometheus Alertmanager, and Prometheus (with
# promtool, which checks and unit-tests deploy/prometheus/rules).
# Installs them when missing and we are root (CI, fresh machines); otherwise says what to install.
set -euo pipefail
missing=()
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
# The packages start system services; the tests start their own Alertmanager and Prometheus on loopback.
(systemctl stop prometheus-alertmanager 2>/dev/null || service prometheus-alertmanager stop 2>/dev/null || pkill -x prometheus-alert || true) >/dev/null 2>&1
for service in prometheus prometheus-node-exporter; do
  (systemctl stop "$service" 2>/dev/null || service "$service" stop 2>/dev/null || true) >/dev/null 2>&1
done
echo "installed: ${missing[*]}"
