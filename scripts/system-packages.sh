#!/usr/bin/env bash
# Install the Debian packages the portal and its tests need, when they are missing.
set -euo pipefail
need=()
ldconfig -p | grep -q 'libpango-1.0.so' || need+=(libpango-1.0-0 libpangoft2-1.0-0)
ldconfig -p | grep -q 'libharfbuzz-subset' || need+=(libharfbuzz-subset0)
fc-list 2>/dev/null | grep -qi dejavu || need+=(fonts-dejavu-core fontconfig)
[ -x /usr/bin/chromium ] || need+=(chromium)
# tests/deploy: nginx in front of the portal, and systemd-analyze for the service units
# (the nginx package's own service is not started: the tests run nginx from a temp folder).
[ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/bin/systemd-analyze ] || need+=(systemd)
# tests/security: ClamAV's daemon, run by the tests from a temp folder with a one-signature
# database (EICAR); neither the package's clamav-daemon service nor freshclam is used.
[ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system packages missing: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
