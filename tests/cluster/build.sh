#!/usr/bin/env bash
# Build the test control-plane binaries from published Go modules:
#   etcd (embedded server), kube-apiserver, kube-controller-manager,
#   kube-scheduler, kubectl (all stock k8s.io/kubernetes cmd packages) and helm.
#
# Binaries are cached OUTSIDE the repository, keyed by the Kubernetes version:
#   ${AMLFS_CACHE:-$HOME/.cache/amlfs}/k8s-<version>/bin
# A stamp file holds a hash of the inputs (go.mod/go.sum files, the Go sources,
# the Go version and RECIPE below), so a warm cache costs nothing and a changed
# input rebuilds. Bump RECIPE when the build flags change.
#
# Usage: tests/cluster/build.sh [--print-bindir] [--force]
#   --print-bindir  only print the bin dir (no build)
#   --force         rebuild even if the stamp matches
# Env: AMLFS_CACHE (cache root), AMLFS_BUILD_NICE (nice level, default 10),
#      GOFLAGS/GOMODCACHE/GOCACHE are honoured as usual.
set -euo pipefail
RECIPE=2  # build flags/outputs version: bump to force rebuilds everywhere

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gomod_dir="$here/go"
helm_dir="$here/go/helm"

pinned() {  # pinned <module> <go.mod>: the required version of a module
  sed -nE "s#^(require)?[[:space:]]*$1 (v[^[:space:]]+).*#\2#p" "$2" | head -n1
}
k8s_version="$(pinned k8s.io/kubernetes "$gomod_dir/go.mod")"
helm_version="$(pinned helm.sh/helm/v3 "$helm_dir/go.mod")"
if [[ -z "$k8s_version" || -z "$helm_version" ]]; then
  echo "build.sh: cannot read pinned versions from go.mod files" >&2
  exit 2
fi

cache_root="${AMLFS_CACHE:-$HOME/.cache/amlfs}"
bindir="$cache_root/k8s-$k8s_version/bin"

print_only=0
force=0
for arg in "$@"; do
  case "$arg" in
    --print-bindir) print_only=1 ;;
    --force) force=1 ;;
    *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [[ $print_only == 1 ]]; then
  echo "$bindir"
  exit 0
fi

if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
command -v go >/dev/null || { echo "build.sh: Go >= 1.26 is needed on PATH" >&2; exit 1; }

binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

input_hash() {
  (
    cd "$here"
    echo "recipe $RECIPE"
    cat go/go.mod go/go.sum go/helm/go.mod go/helm/go.sum
    find go/cmd -type f -name '*.go' | LC_ALL=C sort | xargs cat
    go env GOVERSION
  ) | sha256sum | cut -c1-16
}

mkdir -p "$bindir"
# One build at a time per cache dir (pytest-xdist workers, parallel CI jobs).
exec 9>"$bindir/.lock"
flock 9

want="$(input_hash)"
have="$(cat "$bindir/.stamp" 2>/dev/null || true)"
all_present=1
for b in "${binaries[@]}"; do
  [[ -x "$bindir/$b" ]] || all_present=0
done
if [[ $force == 0 && $all_present == 1 && "$want" == "$have" ]]; then
  echo "build.sh: binaries up to date in $bindir" >&2
  echo "$bindir"
  exit 0
fi

start=$(date +%s)
nice_level="${AMLFS_BUILD_NICE:-10}"
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -trimpath -mod=readonly"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# kubectl version / apiserver /version read these (ldflags like upstream's
# hack/lib/version.sh). client-go's copy feeds the user agent.
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
ldv=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldv+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldv+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit="
done

tmp="$(mktemp -d "$bindir/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "build.sh: building Kubernetes $k8s_version + etcd into $bindir (cold build takes a while)" >&2
(
  cd "$gomod_dir"
  nice -n "$nice_level" go build -ldflags "-s -w$ldv" -o "$tmp/" \
    ./cmd/etcd-embed \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  mv "$tmp/etcd-embed" "$tmp/etcd"
)
echo "build.sh: building helm $helm_version" >&2
(
  cd "$helm_dir"
  nice -n "$nice_level" go build \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    -o "$tmp/helm" helm.sh/helm/v3/cmd/helm
)

for b in "${binaries[@]}"; do
  mv -f "$tmp/$b" "$bindir/$b"
done
echo "$want" > "$bindir/.stamp"
echo "build.sh: done in $(( $(date +%s) - start ))s" >&2
echo "$bindir"
