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

# Bulk-put throughput: single node versus a three-node cluster, same run (prints the ratio).
bench:
    cargo bench --bench bulk_put
