//! `server`: runs the pklock lock server, as `pklock server` does; the code
//! both run is pklock::cli::server.

use std::process::ExitCode;

fn main() -> ExitCode {
    pklock::cli::server::main("server", std::env::args_os())
}
