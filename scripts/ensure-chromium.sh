#!/usr/bin/env bash
# Make sure a headless Chromium is available for the web-page test (tests/serve/test_serve_page.py).
# Idempotent: does nothing when Chromium is already installed. Installs Debian's `chromium` with
# apt-get when running as root; otherwise says how to install it and exits 0 (the test then skips).
set -euo pipefail

for browser in chromium chromium-browser google-chrome; do
    if command -v "$browser" >/dev/null 2>&1; then
        echo "ensure-chromium: found $(command -v "$browser")"
        exit 0
    fi
done

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: installing chromium with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
    echo "ensure-chromium: installed $(command -v chromium)"
else
    echo "ensure-chromium: chromium not found and cannot install it here (needs root and apt-get);" \
         "install it with: sudo apt-get install chromium. The page test will be skipped."
fi
