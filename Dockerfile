# bayard container image: one node per container, one port (5001/udp, QUIC + mutual TLS).
#
#   docker build -t bayard .
#
# Certificates are made outside the container, on the machine that keeps the CA key
# (`bayard certs ca`, `bayard certs node --id 1 --san search-1.internal,10.0.0.1`, ...; see
# docs/deploy.md). Mount a directory holding only ca.pem and this node's pair (never ca.key).
# The key must be mode 0600 and owned by the container user (uid 10001): bayard refuses a key
# others may read.
#
#   mkdir node-1 && cp certs/ca.pem certs/node-1.pem certs/node-1.key node-1/
#   chown 10001:10001 node-1/node-1.key && chmod 600 node-1/node-1.key
#   docker volume create bayard-1
#   docker run -d --name bayard-1 --restart on-failure \
#     -p 5001:5001/udp \
#     -v bayard-1:/var/lib/bayard \
#     -v "$PWD/node-1:/etc/bayard/certs:ro" \
#     -e BAYARD_ID=1 \
#     -e BAYARD_ADVERTISE_HOST=search-1.internal \
#     -e BAYARD_CA=/etc/bayard/certs/ca.pem \
#     -e BAYARD_CERT=/etc/bayard/certs/node-1.pem \
#     -e BAYARD_KEY=/etc/bayard/certs/node-1.key \
#     bayard
#
# Nodes 2 and 3 add `-e BAYARD_PEERS=1=search-1.internal:5001`. Any serve flag can be given as
# a BAYARD_* variable, or as arguments after the image name, which replace CMD
# (`docker run ... bayard serve --id 1`: the image, then the subcommand and its flags).
# `docker stop` sends SIGTERM: the node drains and exits (give it `--time 30`);
# `docker kill --signal HUP bayard-1` re-reads the certificates.
# Client commands run from the same image, e.g. with a directory holding ca.pem and an admin
# pair (key owned by uid 10001 as above):
#   docker run --rm -v "$PWD/ops:/etc/bayard/certs:ro" \
#     -e BAYARD_CERT=/etc/bayard/certs/admin-ops.pem -e BAYARD_KEY=/etc/bayard/certs/admin-ops.key \
#     bayard status --servers search-1.internal:5001

FROM rust:1-bookworm AS builder
WORKDIR /build
# The whole source tree (less what .dockerignore leaves out): the binary embeds etc/schema.json
# and etc/tokenizer.json, and Cargo.toml names the benches.
COPY . .
RUN cargo build --release --locked \
    && install -m 0755 target/release/bayard /usr/local/bin/bayard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bayard \
    && useradd --system --uid 10001 --gid bayard --no-create-home --home-dir /var/lib/bayard \
       --shell /usr/sbin/nologin bayard \
    && install -d -m 0700 -o bayard -g bayard /var/lib/bayard \
    && install -d -m 0755 /etc/bayard /etc/bayard/certs
COPY --from=builder /usr/local/bin/bayard /usr/local/bin/bayard

# Bind every interface of the container; keep data in the volume. BAYARD_CA is preset, the
# node's own pair (BAYARD_CERT, BAYARD_KEY) is not: without it the node refuses to start
# instead of making development certificates.
ENV BAYARD_HOST=0.0.0.0 \
    BAYARD_DATA_DIRECTORY=/var/lib/bayard \
    BAYARD_CA=/etc/bayard/certs/ca.pem

USER bayard:bayard
WORKDIR /var/lib/bayard
VOLUME ["/var/lib/bayard", "/etc/bayard/certs"]
# 5001/udp: QUIC, everything (clients, admin, Raft). 5001/tcp: kept for the planned HTTPS API;
# nothing listens on it yet.
EXPOSE 5001/udp 5001/tcp

STOPSIGNAL SIGTERM
ENTRYPOINT ["bayard"]
CMD ["serve"]
