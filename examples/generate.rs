//! `generate`, kept for one release: the same program as `ferrogen generate` (install it with
//! `cargo install --path .`).

fn main() -> std::process::ExitCode {
    ferrogen::cli::main_as("generate")
}
