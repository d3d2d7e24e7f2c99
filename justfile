# Everyday recipes. `just` is optional: each recipe is one plain command.

default: test

# Debug build of everything.
build:
    cargo build --workspace --locked

# The whole suite (README's test command).
test:
    bash scripts/test

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# The quick start: three replicas on local etcd and PostgreSQL.
demo:
    bash scripts/demo

# Every benchmark scenario at full size (see bench/RESULTS.md).
bench:
    cargo run --release --locked -p eps-bench -- all

# Every benchmark scenario, small enough for a few minutes on 2 cores.
bench-quick:
    cargo run --release --locked -p eps-bench -- all --quick

# The randomized fault-injection suite, long form.
faults seed="0" minutes="30":
    FAULT_SEED={{seed}} FAULT_MINUTES={{minutes}} cargo test --locked --test faults -- --nocapture
