#!/usr/bin/env bash
# Regenerates shared/proto from proto/ (Python, gRPC stubs and mypy .pyi stubs): the
# project's own API (modelguard/v1) and the Open Inference Protocol (inference/).
# protoc writes imports as `from modelguard.v1 import x_pb2`; the generated code lives
# under the `modelguard.proto` package, so the import prefix is rewritten mechanically here
# (and `make proto-check` proves the committed files equal this script's output).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-shared/proto}
PY=${PY:-.venv/bin/python}
rm -rf "$OUT/modelguard" "$OUT/inference"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  proto/modelguard/v1/*.proto proto/inference/*.proto
find "$OUT/modelguard" "$OUT/inference" -name '*.py' -o -name '*.pyi' | sort | while read -r f; do
  sed -i -E 's/^from modelguard\.v1 import/from modelguard.proto.modelguard.v1 import/; s/^import modelguard\.v1\.([a-z_]+_pb2)$/import modelguard.proto.modelguard.v1.\1/; s/([^.a-zA-Z_])modelguard\.v1\.([a-z_]+_pb2)/\1modelguard.proto.modelguard.v1.\2/g; s/^from inference import/from modelguard.proto.inference import/; s/^import inference\.([a-z0-9_]+_pb2)$/import modelguard.proto.inference.\1/; s/([^.a-zA-Z_])inference\.([a-z0-9_]+_pb2)/\1modelguard.proto.inference.\2/g' "$f"
done
touch "$OUT/modelguard/__init__.py" "$OUT/modelguard/v1/__init__.py" "$OUT/inference/__init__.py"
[ -f "$OUT/__init__.py" ] || touch "$OUT/__init__.py"
