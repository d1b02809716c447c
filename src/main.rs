//! The `refex` command line: a thin edge over the library (see `refex::cli`).

fn main() -> std::process::ExitCode {
    refex::cli::main()
}
