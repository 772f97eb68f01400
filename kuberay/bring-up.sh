#!/usr/bin/env bash
# Bring the platform up on a local Kind cluster and run the MNIST RayJob on it.
#
# NOT RUN IN CI: it needs a Docker engine, kind, kubectl and terraform (>= 1.6), and network
# access to Docker Hub and the Helm chart repositories. CI checks every file it applies offline
# (tests/unit/test_kuberay_manifests.py, tests/unit/test_terraform.py).
#
#   kuberay/bring-up.sh            # CPU only
#   GPU_NODES=1 kuberay/bring-up.sh  # plus a Kind node with the host's GPUs (see kuberay/README.md)
#   kuberay/bring-up.sh down       # delete the cluster
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-oppen}
GPU_NODES=${GPU_NODES:-0}
IMAGE=oppen/ray:$(python3 -c 'import re;print(re.search(r"ray\[[^]]*\]==([\d.]+)",open("pyproject.toml").read())[1])')
TF=(terraform -chdir=terraform)
VARS=(-var "cluster_name=$CLUSTER" -var "gpu_nodes=$GPU_NODES")
say() { printf '\n== %s\n' "$*"; }

if [[ "${1:-up}" == down ]]; then
  "${TF[@]}" destroy -auto-approve "${VARS[@]}"
  exit 0
fi

for tool in docker kind kubectl terraform; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (see kuberay/README.md)" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "error: the Docker engine does not answer" >&2; exit 2; }

say "build $IMAGE (Ray's image + this project)"
docker build -f kuberay/Dockerfile -t "$IMAGE" .

say "terraform: the Kind cluster first (its nodes must exist to load the image into)"
"${TF[@]}" init -input=false
"${TF[@]}" apply -auto-approve -input=false "${VARS[@]}" -target=kind_cluster.oppen
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "terraform: operators, MLflow + PostgreSQL, the RayCluster, the RayService, the dispatcher"
"${TF[@]}" apply -auto-approve -input=false "${VARS[@]}"
export KUBECONFIG="${KUBECONFIG:-$HOME/.kube/config}"
kubectl config use-context "kind-$CLUSTER" >/dev/null

say "wait for MLflow, the training cluster and the Serve apps"
kubectl -n oppen rollout status statefulset/oppen-postgres --timeout=10m
kubectl -n oppen rollout status deployment/oppen-mlflow --timeout=10m
kubectl -n oppen wait raycluster/oppen --for=jsonpath='{.status.state}'=ready --timeout=15m
kubectl -n oppen wait rayservice/oppen-serve --for=condition=Ready --timeout=15m
kubectl -n oppen rollout status deployment/oppen-dispatcher --timeout=10m

say "port-forward the dashboard, MLflow and Serve to 127.0.0.1"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
kubectl -n oppen port-forward svc/oppen-head-svc 8265:8265 >/dev/null & pids+=($!)
kubectl -n oppen port-forward svc/oppen-mlflow 5000:5000 >/dev/null & pids+=($!)
kubectl -n oppen port-forward svc/oppen-serve-serve-svc 8000:8000 >/dev/null & pids+=($!)
sleep 3

# The local `oppen` now talks to the cluster: same commands, the address is the only switch.
RAY_AUTH_TOKEN=$(kubectl -n oppen get secret oppen-ray-token -o jsonpath='{.data.auth_token}' | base64 -d)
export RAY_AUTH_TOKEN RAY_ADDRESS=http://127.0.0.1:8265 MLFLOW_TRACKING_URI=http://127.0.0.1:5000

say "run the MNIST RayJob (kuberay/ray-job.mnist.yaml) and follow it"
kubectl -n oppen delete rayjob mnist --ignore-not-found --wait=true
.venv/bin/oppen kube apply kuberay/ray-job.mnist.yaml --wait --timeout 3600

say "done"
"${TF[@]}" output
echo "MNIST run: open MLflow at http://127.0.0.1:5000 (experiment 'mnist'); Ctrl-C stops the port-forwards."
wait
