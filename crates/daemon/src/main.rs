fn main() -> std::process::ExitCode {
    matrixd::cli::main()
}
