#!/usr/bin/env bash
# Create a kind cluster for the e2e suite and load the project's images.
#
#   tests/e2e/kind-up.sh            # cluster "amlfs", images built from ./Dockerfile and trainer_image/Dockerfile
#   KIND_CLUSTER=x tests/e2e/kind-up.sh
#
# Needs docker, kind and kubectl on PATH. It writes the cluster's kubeconfig
# to $KUBECONFIG_OUT (default ./.kind-kubeconfig); then run the same suite:
#   AMLFS_TEST_CLUSTER=external KUBECONFIG=$PWD/.kind-kubeconfig python -m pytest tests/cluster
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cluster="${KIND_CLUSTER:-amlfs}"
node_image="${KIND_NODE_IMAGE:-}"          # e.g. kindest/node:v1.34.0; empty: kind's default
kubeconfig_out="${KUBECONFIG_OUT:-$repo/.kind-kubeconfig}"
operator_image="${OPERATOR_IMAGE:-amlfs-operator:dev}"
trainer_image="${TRAINER_IMAGE:-amlfs-trainer:dev}"

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-up.sh: $tool not found on PATH" >&2; exit 1; }
done

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "kind-up.sh: reusing kind cluster $cluster"
else
  args=(create cluster --name "$cluster" --wait 120s)
  [[ -n "$node_image" ]] && args+=(--image "$node_image")
  kind "${args[@]}"
fi
kind get kubeconfig --name "$cluster" > "$kubeconfig_out"

docker build -t "$operator_image" -f "$repo/Dockerfile" "$repo"
docker build -t "$trainer_image" -f "$repo/trainer_image/Dockerfile" "$repo"
kind load docker-image --name "$cluster" "$operator_image" "$trainer_image"

# The local process kubelet advertises nvidia.com/gpu; give kind's nodes a
# fake count too so GPU requests schedule (no device plugin: nothing real).
gpus="${KIND_FAKE_GPUS:-2}"
if [[ "$gpus" != 0 ]]; then
  for node in $(kubectl --kubeconfig "$kubeconfig_out" get nodes -o name); do
    kubectl --kubeconfig "$kubeconfig_out" patch "$node" --subresource=status --type=merge \
      -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$gpus\"}}}"
  done
fi

kubectl --kubeconfig "$kubeconfig_out" wait --for=condition=Ready nodes --all --timeout=120s
echo "export KUBECONFIG=$kubeconfig_out"
