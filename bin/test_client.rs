//! `test_client`: the original testClient.php, as pklock::cli::test_client
//! runs it.

use std::process::ExitCode;

fn main() -> ExitCode {
    pklock::cli::test_client::main(std::env::args_os())
}
