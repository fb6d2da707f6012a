#!/usr/bin/env bash
# `make test`'s set-up for the tests that drive real outside programs: Debian's chromium (which Playwright
# drives in tests/test_ui.py; it downloads no browser of its own) and Debian's postgresql (the team
# server's database in tests/test_server.py and test_tracking.py). Installed only where they can be (root, apt-get), in one
# apt-get call; elsewhere those tests skip, saying so. Never fails the suite.
missing=()
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CAPSX_CHROMIUM:-}" ]; then
    missing+=(chromium)
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "no ${missing[*]}, and no root apt-get to install them: their tests will skip"
    exit 0
fi
echo "installing Debian's ${missing[*]} for the browser and database tests (once)..."
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >/tmp/capsx-install-test-packages.log 2>&1; then
    echo "could not install ${missing[*]} (see /tmp/capsx-install-test-packages.log): their tests will skip"
fi
exit 0
