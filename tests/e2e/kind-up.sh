#!/usr/bin/env bash
# Create a kind cluster for the cluster test suite: the project's images loaded into it and the services the
# tests need (SeaweedFS S3, Pushgateway, Prometheus: tests/e2e/manifests) running inside it.
#
#   tests/e2e/kind-up.sh            # cluster "amlfs"; images from ./Dockerfile and trainer_image/Dockerfile
#   KIND_CLUSTER=x tests/e2e/kind-up.sh
#
# Needs docker, kind and kubectl on PATH. The trainer image is the CPU-only target (kind nodes have no GPU). It
# writes the cluster's kubeconfig to $KUBECONFIG_OUT (default ./.kind-kubeconfig); then run the same suite:
#   AMLFS_TEST_CLUSTER=external KUBECONFIG=$PWD/.kind-kubeconfig python -m pytest tests/cluster
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cluster="${KIND_CLUSTER:-amlfs}"
node_image="${KIND_NODE_IMAGE:-}"          # e.g. kindest/node:v1.34.0; empty: kind's default
kubeconfig_out="${KUBECONFIG_OUT:-$repo/.kind-kubeconfig}"
operator_image="${OPERATOR_IMAGE:-amlfs-operator:dev}"
trainer_image="${TRAINER_IMAGE:-amlfs-trainer:dev}"
trainer_target="${TRAINER_TARGET:-cpu}"    # cuda: the GPU image (several GB; for clusters with GPUs)

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-up.sh: $tool not found on PATH" >&2; exit 1; }
done

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "kind-up.sh: reusing kind cluster $cluster"
else
  # the config publishes the test services' NodePorts on 127.0.0.1 (the test process reaches them there)
  args=(create cluster --name "$cluster" --config "$repo/tests/e2e/kind-config.yaml" --wait 120s)
  if [[ -n "$node_image" ]]; then
    args+=(--image "$node_image")
  fi
  kind "${args[@]}"
fi
kind get kubeconfig --name "$cluster" > "$kubeconfig_out"
kc=(kubectl --kubeconfig "$kubeconfig_out")

# the services first: their images are pulled while ours build
"${kc[@]}" apply -f "$repo/tests/e2e/manifests/"

docker build -t "$operator_image" -f "$repo/Dockerfile" "$repo"
docker build -t "$trainer_image" --target "$trainer_target" -f "$repo/trainer_image/Dockerfile" "$repo"
kind load docker-image --name "$cluster" "$operator_image" "$trainer_image"

# kind's nodes have no GPU and no device plugin: advertise a fake nvidia.com/gpu count so that the trainer pods'
# GPU requests schedule (they train on the CPU).
gpus="${KIND_FAKE_GPUS:-2}"
if [[ "$gpus" != 0 ]]; then
  for node in $("${kc[@]}" get nodes -o name); do
    "${kc[@]}" patch "$node" --subresource=status --type=merge \
      -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$gpus\"}}}"
  done
fi

"${kc[@]}" wait --for=condition=Ready nodes --all --timeout=120s
"${kc[@]}" -n amlfs-e2e wait --for=condition=Available deployment --all --timeout=300s
echo "export KUBECONFIG=$kubeconfig_out AMLFS_TEST_CLUSTER=external" \
  "AMLFS_TEST_IMAGE=$trainer_image AMLFS_TEST_OPERATOR_IMAGE=$operator_image"
