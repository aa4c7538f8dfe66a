#!/usr/bin/env bash
# On the GPU machine: moves the carried .device/ pieces of this call into a stash that
# outlives the call (the machine stays warm ~30 s between calls; each call brings a
# fresh copy of the tree). Prints what the stash holds.
#
#   scripts/device/stash.sh            (in the repository root there)
set -euo pipefail
cd "$(dirname "$0")/../.."
stash="${HASS_DEVICE_STASH:-/root/hass-stash}"
mkdir -p "$stash"
if [ -d .device ]; then
    (cd .device && find . -type f -print0 | while IFS= read -r -d '' f; do
        mkdir -p "$stash/$(dirname "$f")"
        cp -f "$f" "$stash/$f"
    done)
fi
echo "stash $stash:"
(cd "$stash" && find . -type f | sort | xargs -r du -b)
