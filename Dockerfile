# syntax=docker/dockerfile:1
# Multi-stage build of the `epp` endpoint picker.
#   docker build -t ghcr.io/swift-epp/epp:latest .
# Builder: Swift 6 on Debian 12 (bookworm) with the nghttp2 and OpenSSL headers.
# Runtime: debian:bookworm-slim with only libnghttp2 and libssl (+ CA certificates) and the binary; the
# Swift runtime and Foundation are linked statically. Runs as a non-root user.
ARG SWIFT_IMAGE=swift:6.3-bookworm

FROM ${SWIFT_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnghttp2-dev libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first (cached while only sources change).
COPY Package.swift ./
RUN swift package resolve
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --product epp --static-swift-stdlib -Xlinker -s \
 && install -D -m 0755 "$(swift build -c release --show-bin-path)/epp" /out/epp

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnghttp2-14 libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/epp /usr/local/bin/epp
# 65532: the conventional "nonroot" uid/gid (matches the Deployment's securityContext).
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["/usr/local/bin/epp"]
