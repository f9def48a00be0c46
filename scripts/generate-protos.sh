#!/usr/bin/env bash
# Regenerates Sources/Protos from the compiled descriptors shipped in the PyPI packages
# xds-protos (Envoy API), grpcio-health-checking (grpc.health.v1) and opentelemetry-proto (OTLP
# traces); no .proto files needed.
# Needs: protoc (Debian protobuf-compiler), a Python with xds-protos + grpcio-health-checking +
# opentelemetry-proto==1.45.2 installed after xds-protos (which ships an old copy of the OTLP modules:
#   pip install --force-reinstall --no-deps opentelemetry-proto==1.45.2),
# and protoc-gen-swift built from the swift-protobuf version in Package.swift:
#   PROTOC_GEN_SWIFT=/path/to/protoc-gen-swift PYTHON=.venv/bin/python scripts/generate-protos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PROTOC_GEN_SWIFT=${PROTOC_GEN_SWIFT:-$(command -v protoc-gen-swift || true)}
[ -x "$PROTOC_GEN_SWIFT" ] || { echo "set PROTOC_GEN_SWIFT to a protoc-gen-swift binary" >&2; exit 1; }
out=Sources/Protos/Generated
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PYTHON" scripts/gen_descriptor_set.py --preset all -o "$tmp/set.pb" --list "$tmp/files"
rm -rf "$out"; mkdir -p "$out"
# FileNaming=PathToUnderscores keeps files from different packages (several are named base.proto) apart.
protoc --plugin=protoc-gen-swift="$PROTOC_GEN_SWIFT" --descriptor_set_in="$tmp/set.pb" \
  --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
  --swift_out="$out" $(cat "$tmp/files")
echo "generated $(ls "$out" | wc -l) files into $out"
