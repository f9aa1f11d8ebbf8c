#!/usr/bin/env bash
# The UI test drives Debian's headless Chromium; install it when missing and we are root with apt.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the browser test will skip"
else
  echo "note: chromium not found and not installable here; the browser test will skip"
fi
exit 0
