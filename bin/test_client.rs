//! `test_client`: the original testClient.php. Takes a lock, prints
//! `Got lock`, holds it, prints `Offering to unlock`, unlocks, lingers, exits;
//! prints `Did not get lock` (and exits 0) when not granted in time.

use std::error::Error;
use std::io::Write;
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pklock::{duration, frame};
use serde_json::{Value, json};

/// Takes a lock, holds it, gives it up: run several at once to watch the
/// lock pass from one to the next in order.
#[derive(Parser)]
#[command(name = "test_client", version)]
struct Args {
    /// Server host.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Server port.
    #[arg(long, default_value_t = pklock::config::DEFAULT_PORT)]
    port: u16,
    /// Lock name.
    #[arg(long = "lock", default_value = "test")]
    lock: String,
    /// How long to hold the lock (30s, 500ms, or seconds).
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    hold: Duration,
    /// How long to stay connected after unlocking.
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    linger: Duration,
    /// How long to wait for the lock before giving up.
    #[arg(long, default_value = "30", value_parser = duration::parse)]
    wait: Duration,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test_client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let mut stream = TcpStream::connect((args.host.as_str(), args.port)).map_err(|e| {
        format!(
            "cannot connect to {}:{}: {e} (is the server running? `cargo run --bin server`)",
            args.host, args.port
        )
    })?;
    stream.set_nodelay(true)?;
    let client = format!("test_client pid {}", std::process::id());
    call(
        &mut stream,
        json!({"command": "hello", "id": 0, "parameters": {"client": client}}),
    )?;

    let wait_ms = u64::try_from(args.wait.as_millis()).unwrap_or(u64::MAX);
    let lock = json!({"command": "lock", "id": 1, "parameters": {"lockName": args.lock, "timeoutMs": wait_ms}});
    let result = call(&mut stream, lock)?;
    match result["status"].as_str() {
        Some("ok") => println!("Got lock"),
        Some("timeout") => {
            println!("Did not get lock");
            return Ok(());
        }
        _ => return Err(format!("unexpected answer to lock: {result}").into()),
    }
    std::io::stdout().flush()?;

    std::thread::sleep(args.hold);
    println!("Offering to unlock");
    std::io::stdout().flush()?;
    call(
        &mut stream,
        json!({"command": "unlock", "id": 2, "parameters": {"lockName": args.lock}}),
    )?;
    std::thread::sleep(args.linger);
    Ok(())
}

/// Sends one RPC and returns the `result` of the reply with its id.
fn call(stream: &mut TcpStream, request: Value) -> Result<Value, Box<dyn Error>> {
    let body = serde_json::to_vec(&request)?;
    frame::write_blocking(stream, &body)?;
    loop {
        let body = frame::read_blocking(stream, 1 << 20)
            .map_err(|e| format!("lost the connection to the server: {e}"))?;
        let mut reply: Value = serde_json::from_slice(&body)?;
        if reply.get("id") == request.get("id") {
            return Ok(reply["result"].take());
        }
    }
}
