//! `tunnelctl` entry point: run, and on failure print one line and exit non-zero.

fn main() {
    let code = match tunnelctl::cli::main_with(std::env::args_os(), &mut std::io::stdout()) {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<tunnelctl::cli::Exit>() {
            // The report is printed already; this is its verdict.
            Some(x) => {
                eprintln!("{x}");
                x.code
            }
            None => {
                eprintln!("error: {}", tunnelctl::cli::one_line(&e));
                1
            }
        },
    };
    std::process::exit(code);
}
