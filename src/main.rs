//! The `conveyor` binary: everything lives in the library; see `conveyor --help`.

/// mimalloc instead of glibc malloc: deliveries are allocated on lapin's I/O thread and freed
/// on the worker's, the pattern glibc's per-thread arenas handle worst (it showed as ~12 % of the
/// daemon's CPU in `perf` during a drain).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    conveyor::cli::main()
}
