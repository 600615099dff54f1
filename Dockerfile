# syntax=docker/dockerfile:1
# The hybridnet Talos system extension, for those who build with Docker (hack/build-image.sh builds the same
# tree, a plain tar and an OCI layout without Docker; see docs/talos.md). Multi-arch with buildx:
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/<you>/hybridnet:v0.1.0 --push .
#
# The build stage runs on the build machine's platform and cross-compiles (static musl; arm64 with Debian's
# gcc-aarch64-linux-gnu as the C compiler for ring and as the linker), stages the tree from extension/ and checks
# it with our validator. The final image is FROM scratch and holds exactly manifest.yaml and rootfs/, as Talos
# requires. (Not built in this project's CI, which has no Docker engine.)
FROM --platform=$BUILDPLATFORM rust:1.89-bookworm AS build
ARG TARGETARCH
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN set -eu; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-musl ;; \
      arm64) triple=aarch64-unknown-linux-musl; \
             export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
                    AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar \
                    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc ;; \
      *) echo "unsupported architecture $TARGETARCH" >&2; exit 1 ;; \
    esac; \
    rustup target add "$triple"; \
    RUSTFLAGS="--remap-path-prefix=/src=/hybridnet" cargo build --release --locked --target "$triple" \
      -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal --bins; \
    cargo build --locked -p hybridnet-extension-validator; \
    version="v$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version *=/{print $2; exit}' Cargo.toml)"; \
    target/debug/hybridnet-extension-validator stage --extension extension \
      --bin-dir "target/$triple/release" --out /tree --version "$version"; \
    target/debug/hybridnet-extension-validator validate --rootfs /tree --pkg-name hybridnet --strict

FROM scratch
COPY --from=build /tree/ /
