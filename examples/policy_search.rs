//! `policy_search`, kept for one release: the same program as `ferrogen policy-search` (install it with
//! `cargo install --path .`).

fn main() -> std::process::ExitCode {
    ferrogen::cli::main_as("policy_search")
}
