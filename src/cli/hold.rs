//! `pklock lock`: takes a lock (or several together, one token for all, or
//! a semaphore's permits), prints its fencing token on stdout, and holds
//! it until stdin closes or INT, TERM or HUP arrives; for interactive use and
//! for shells that hold a lock across several commands with a coprocess.
//! When the lock is lost it prints `lost` and keeps the connection until
//! then all the same: the script's work may still be running, and nobody
//! else may get the lock before it has stopped.

use std::io::{self, Read, Write};
use std::sync::mpsc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{Acquire, Failure, StopTime, exit, say};
use crate::client::LossReason;

enum Event {
    StdinClosed,
    Signal,
    Lost(LossReason),
}

/// Holds the lock; returns the exit code for pklock.
pub fn hold(acquire: &Acquire) -> Result<u8, Failure> {
    acquire.check()?;
    let client = super::connect(
        &acquire.server,
        &acquire.access,
        &format!("pklock lock {}", acquire.listed()),
        StopTime::Exactly(Default::default()),
    )?;
    let guard = super::take(&client, acquire)?;

    let (tx, events) = mpsc::channel();
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot handle signals: {e}")))?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = signal_tx.send(Event::Signal);
        }
    });
    let stdin_tx = tx.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        let mut stdin = io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = stdin_tx.send(Event::StdinClosed);
    });
    client.on_lost(move |reason| {
        let _ = tx.send(Event::Lost(reason.clone()));
    });

    let mut stdout = io::stdout();
    // Scripts read this line to know the lock is held.
    let announced = writeln!(stdout, "{}", guard.token()).and_then(|()| stdout.flush());
    if announced.is_err() {
        return Err(Failure::new(
            exit::SOFTWARE,
            "cannot write the token to stdout",
        ));
    }
    match events.recv() {
        Ok(Event::StdinClosed | Event::Signal) => {
            guard
                .unlock()
                .map_err(|e| Failure::new(acquire.lost_code, format!("{}: {e}", acquire.what())))?;
            Ok(0)
        }
        Ok(Event::Lost(reason)) => {
            let kept = match reason {
                LossReason::Closed(_) | LossReason::Broken(_) => "",
                _ => {
                    " (if the network only faltered, nobody else gets the lock before that; if \
                     the server is really cut off, it may release the lock soon: stop now)"
                }
            };
            say(format_args!(
                "lost the {}: {reason}; stop the work, then close pklock's stdin{kept}",
                acquire.what()
            ));
            // Scripts that poll stdout learn it here; the exit code says it again.
            let _ = writeln!(stdout, "lost").and_then(|()| stdout.flush());
            loop {
                match events.recv() {
                    Ok(Event::StdinClosed | Event::Signal) | Err(_) => break,
                    Ok(Event::Lost(_)) => {}
                }
            }
            drop(guard);
            Err(Failure::new(
                acquire.lost_code,
                format!("lost the {}: {reason}", acquire.what()),
            ))
        }
        Err(_) => Err(Failure::new(
            exit::SOFTWARE,
            "lost track of stdin and signals",
        )),
    }
}
