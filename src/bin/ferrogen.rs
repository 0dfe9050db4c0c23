//! The `ferrogen` command line: `ferrogen score | generate | merge | policy-search |
//! calibrate`, `ferrogen --help` for more.

fn main() -> std::process::ExitCode {
    ferrogen::cli::main()
}
