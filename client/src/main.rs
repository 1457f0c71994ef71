//! `tunnelctl` entry point: run, and on failure print one line and exit non-zero.

fn main() {
    let code = match tunnelctl::cli::main_with(std::env::args_os(), &mut std::io::stdout()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", tunnelctl::cli::one_line(&e));
            1
        }
    };
    std::process::exit(code);
}
