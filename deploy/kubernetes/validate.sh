#!/usr/bin/env bash
# Validates the manifests of deploy/kubernetes offline (no cluster needed):
#   1. `kubectl kustomize` renders kustomization.yaml (when kubectl exists);
#   2. every manifest, and the rendered set, against the JSON schemas of
#      Kubernetes 1.30 ... 1.37 in strict mode (unknown fields are errors),
#      with kubernetes-validate from PyPI (it ships the schemas), installed
#      into target/venv-k8s-validate on first use;
#   3. what the schemas cannot see (check_manifests.py): no preStop hook
#      other than a sleep (SIGTERM drains), the drain fits in
#      terminationGracePeriodSeconds, readiness on /readyz,
#      the headless Service publishes not-ready pods and names the
#      StatefulSet's serviceName, selectors match the pod labels, the Secret
#      keys used exist, the ports named in probes and Services exist.
# Usage: deploy/kubernetes/validate.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/target/venv-k8s-validate"
versions=(1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
files=("$here/services.yaml" "$here/statefulset.yaml" "$here/pdb.yaml" "$here/secret.example.yaml")

if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    echo "== installing kubernetes-validate into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rendered=""
if command -v kubectl >/dev/null 2>&1; then
    echo "== kubectl kustomize ($(kubectl version --client 2>/dev/null | head -n 1))"
    kubectl kustomize "$here" >"$tmp/rendered.yaml"
    grep -E '^kind: ' "$tmp/rendered.yaml" | sort | uniq -c
    rendered="$tmp/rendered.yaml"
else
    echo "== kubectl not found: skipping the kustomize render"
fi

echo "== kubernetes-validate --strict (schemas of Kubernetes ${versions[0]} ... ${versions[-1]})"
for v in "${versions[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}" ${rendered:+"$rendered"} ||
        { echo "validate.sh: FAILED against Kubernetes $v" >&2; exit 1; }
    echo "  $v: ok (${#files[@]} files${rendered:+ + the kustomize output})"
done

echo "== consistency checks"
"$venv/bin/python" "$here/check_manifests.py" "${files[@]}"
