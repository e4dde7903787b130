//! The `conveyor` binary: everything lives in the library; see `conveyor --help`.

fn main() -> std::process::ExitCode {
    conveyor::cli::main()
}
