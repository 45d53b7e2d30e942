#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the study page's browser test (tests/test_study.py).
# Browser downloaders (playwright install, puppeteer) cannot reach their servers here; the
# distribution's packages can be installed. Needs root (CI runs as root) or sudo.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "install_browser.sh: $(chromium --version 2>/dev/null | head -1) already installed"
  exit 0
fi
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -q >/dev/null
$sudo_cmd apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
echo "install_browser.sh: $(chromium --version 2>/dev/null | head -1)"
