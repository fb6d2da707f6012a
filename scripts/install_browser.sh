#!/usr/bin/env bash
# `make test`'s set-up for tests/test_ui_browser.py: Debian's chromium, which Playwright drives (it downloads
# no browser of its own). Installed only where it can be (root, apt-get); elsewhere that test skips, saying so.
# Never fails the suite: a machine without a browser still runs every other test.
if command -v chromium >/dev/null 2>&1 || [ -n "${CAPSX_CHROMIUM:-}" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "no chromium, and no root apt-get to install it: tests/test_ui_browser.py will skip"
    exit 0
fi
echo "installing Debian's chromium for the browser test (once)..."
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
        >/tmp/capsx-install-chromium.log 2>&1; then
    echo "could not install chromium (see /tmp/capsx-install-chromium.log): tests/test_ui_browser.py will skip"
fi
exit 0
