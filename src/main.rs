//! The `refex` command line: a thin edge over the library (see `refex::edge::cli`).

fn main() -> std::process::ExitCode {
    refex::edge::cli::main()
}
