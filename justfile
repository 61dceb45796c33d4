# bayard tasks. `just ci` is what CI runs (see .ci/run).

default: build

# Build the release binary (target/release/bayard).
build:
    cargo build --release

# The whole test suite: unit, integration, CLI (the README's test command).
test:
    cargo test --release

# Formatting and lints, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Everything CI checks.
ci: lint test

# Run one node on the embedded defaults (development certificates made in certs/ on first start).
serve *ARGS:
    cargo run --release -- serve {{ARGS}}

# Make a CA, certificates for nodes 1-3, a client `app` and an admin `ops` in certs/.
certs:
    cargo run --release -- certs ca --out-dir certs
    for id in 1 2 3; do cargo run --release -- certs node --id $id --san localhost,127.0.0.1 --out-dir certs; done
    cargo run --release -- certs client --name app --out-dir certs
    cargo run --release -- certs admin --name ops --out-dir certs

# The fault-injection suite, long: ROUNDS rounds of faults (FAULTS in rotation, all six by
# default) against three processes in network namespaces (root). The test suite runs 6.
# `just chaos 20 kill-leader` measures one fault.
chaos ROUNDS="100" FAULTS="kill-leader,kill-follower,stop-leader,cut-leader,cut-follower,rolling-restart":
    BAYARD_CHAOS_ROUNDS={{ROUNDS}} BAYARD_CHAOS_FAULTS={{FAULTS}} BAYARD_NETNS_REQUIRED=1 cargo test --release --test chaos -- --nocapture

# Benchmarks, each printing ratios against a baseline measured in the same run: single puts
# against the disk's fsync, bulk ingest through the CLI against tantivy in-process, trace export
# on against off, and search over QUIC, the REST gateway and the Elasticsearch door against
# tantivy in-process (the corpus is Debian's dict-gcide, fetched once with apt-get download).
# Figures: docs/performance.md. The search bench also measures `tantivy serve`, which
# `just bench-tools` installs (it is skipped, and says so, without it).
bench: bench-tools
    cargo bench --bench puts
    cargo bench --bench bulk_put
    cargo bench --bench telemetry_overhead
    cargo bench --bench search
    cargo bench --bench request_table
    cargo bench --bench snapshot_chunk

# tantivy-cli (`tantivy serve`, the plain HTTP tantivy server the search bench compares against)
# from crates.io into target/bench-tools; nothing of it is in this repository. Not `--locked`:
# its lock file pins a dependency of its HTTP stack that today's compiler refuses.
bench-tools:
    [ -x target/bench-tools/bin/tantivy ] || cargo install tantivy-cli --version 0.24.0 --root target/bench-tools

# A local three-node cluster on ports 5001-5003 with generated certificates; Ctrl-C stops it.
cluster:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release
    bayard=target/release/bayard
    mkdir -p data
    [ -f certs/ca.pem ] || $bayard certs ca --out-dir certs
    for id in 1 2 3; do [ -f certs/node-$id.pem ] || $bayard certs node --id $id --out-dir certs; done
    [ -f certs/admin-ops.pem ] || $bayard certs admin --name ops --out-dir certs
    trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
    peers=""
    for id in 1 2 3; do
        $bayard serve --id $id --host 127.0.0.1 --port 500$id --data-directory data/$id \
            --ca certs/ca.pem --cert certs/node-$id.pem --key certs/node-$id.key ${peers:+--peers "$peers"} \
            > data/node-$id.log 2>&1 &
        peers="${peers:+$peers,}$id=127.0.0.1:500$id"
        sleep 1
    done
    echo "three nodes on 127.0.0.1:5001-5003; logs in data/node-<id>.log; Ctrl-C stops them"
    echo "try: BAYARD_CERT=certs/admin-ops.pem BAYARD_KEY=certs/admin-ops.key $bayard status"
    wait
