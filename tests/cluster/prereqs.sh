#!/usr/bin/env bash
# Prerequisites of tests/cluster, idempotent (called by tests/run.sh):
#  - Debian's prometheus + prometheus-pushgateway (apt), when missing;
#  - the control-plane binaries (build.sh: cached outside the repo, keyed by
#    version; cold about 15 min on 2 cores and ~180 MB of Go modules, warm < 1 s).
# Needs: Go >= 1.26 (on PATH or /usr/local/go/bin), util-linux (setpriv,
# unshare), mount, openssl — all on this project's machines.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null || need+=(prometheus-pushgateway)
if ((${#need[@]})); then
  sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  echo "prereqs.sh: apt-get install ${need[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
for tool in go openssl setpriv unshare mount; do
  command -v "$tool" >/dev/null || { echo "prereqs.sh: $tool not found" >&2; exit 1; }
done

"$here/build.sh" >/dev/null
