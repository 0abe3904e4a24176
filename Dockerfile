# syntax=docker/dockerfile:1
#
#   docker build -t hubspot-sidecar .                        # the sidecar (default target)
#   docker build --target emulator -t hubspot-emulator .     # the HubSpot emulator
#
# Both images hold one static-ish binary (glibc, rustls: no OpenSSL) on distroless,
# running as the unprivileged user 65532.

ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# The manifests first, so that the dependency layer is reused while only sources change.
COPY Cargo.toml Cargo.lock ./
COPY emulator/Cargo.toml emulator/Cargo.toml
RUN mkdir -p src emulator/src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > emulator/src/main.rs && touch emulator/src/lib.rs \
 && echo 'fn main() {}' > benches/pipeline.rs \
 && cargo fetch --locked
COPY src src
COPY sql sql
COPY benches benches
COPY emulator emulator
RUN cargo build --release --locked --offline -p hubspot-sidecar -p hubspot-emulator \
 && mkdir -p /out \
 && cp target/release/hubspot-sidecar target/release/hubspot-emulator /out/

# The HubSpot emulator, for docker-compose and local runs (not for production).
FROM gcr.io/distroless/cc-debian12:nonroot AS emulator
COPY --from=builder /out/hubspot-emulator /usr/local/bin/hubspot-emulator
ENV EMULATOR_HOST=0.0.0.0 \
    EMULATOR_PORT=8090
EXPOSE 8090
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hubspot-emulator"]

# The sidecar.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/hubspot-sidecar /usr/local/bin/hubspot-sidecar
ENV SIDECAR_LISTEN=0.0.0.0:9187 \
    LOG_FORMAT=json
EXPOSE 9187
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hubspot-sidecar"]
CMD ["run"]
