#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf modules of the control plane from proto/wqs.proto.
#
#   scripts/gen_proto.sh [OUT_ROOT]
#
# Writes OUT_ROOT/wqs/rpc/control_pb2.py, control_pb2_grpc.py and control_pb2.pyi
# (OUT_ROOT defaults to the repository root). Idempotent: the same grpcio-tools version
# gives byte-identical files. Needs grpcio-tools; the Python is $PYTHON, else the
# repository's .venv, else python3.
#
# The proto is compiled under the name wqs/rpc/control.proto (copied into a staging
# directory) so protoc itself names the module wqs.rpc.control_pb2 and the gRPC module
# imports it package-relative (`from wqs.rpc import control_pb2`): no editing of
# generated code.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_root="${1:-$repo}"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    py="$repo/.venv/bin/python"
else
    py="python3"
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/src/wqs/rpc" "$stage/out"
cp "$repo/proto/wqs.proto" "$stage/src/wqs/rpc/control.proto"

# Relative paths only, so nothing about this machine ends up in the generated files.
(cd "$stage/src" && "$py" -m grpc_tools.protoc -I . \
    --python_out="$stage/out" --pyi_out="$stage/out" --grpc_python_out="$stage/out" \
    wqs/rpc/control.proto)

mkdir -p "$out_root/wqs/rpc"
for f in control_pb2.py control_pb2_grpc.py control_pb2.pyi; do
    cp "$stage/out/wqs/rpc/$f" "$out_root/wqs/rpc/$f"
done
echo "generated $out_root/wqs/rpc/control_pb2{.py,_grpc.py,.pyi} from proto/wqs.proto"
