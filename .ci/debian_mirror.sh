#!/usr/bin/env bash
# CI only, sourced: `debian_mirror` prints the Debian mirror this machine's apt already uses
# (deb822 sources, else sources.list), so that CI fetches from nowhere the machine does not.
debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$uri" ] || { echo "no Debian mirror in the apt sources" >&2; return 1; }
  echo "$uri"
}
