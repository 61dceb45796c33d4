//! The `bayard` binary: parses the command line and hands over to `bayard::cli`.

use clap::Parser as _;

/// mimalloc rather than glibc's malloc: allocation was a sixth of a loaded node's CPU under
/// glibc (many threads, short-lived buffers). Built without transparent huge pages, which
/// doubled an idle node's memory. See docs/performance.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let raw: Vec<String> = std::env::args().collect();
    let arguments = match bayard::cli::Arguments::try_parse_from(&raw) {
        Ok(arguments) => arguments,
        Err(error) => {
            // Forms of the original Bayard get a refusal that says what to use instead; clap's
            // own "a similar argument exists" tips point at unrelated flags for them.
            if let Some(hint) = bayard::cli::legacy_hint(&raw) {
                eprintln!("error: {hint}");
                return std::process::ExitCode::from(2);
            }
            error.exit();
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bayard::cli::run(arguments)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
