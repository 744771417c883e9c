//! `pklock release NAME --force`: has the server close the connection of
//! every holder of a lock (an admin's last resort for a holder that hangs),
//! and says whose. Without `--force` it only explains why a lock cannot be
//! released from outside its holder.

use std::time::Duration;

use super::{Access, Failure, StopTime, exit};
use crate::client::ForceRelease;

/// Why `release` wants `--force`.
pub const WHY_FORCE: &str = "a lock belongs to its holder's connection: it is released when \
    the holder unlocks it or its connection closes. `pklock release NAME --force` has the server \
    close the connection of every holder of NAME (this needs the server's admin right), which \
    also releases everything else that connection held";

/// What `release` prints and the exit code: 0 and the holders closed, or
/// 1 (the conflict code) when nobody held the lock.
pub fn release(server: &str, access: &Access, name: &str, force: bool) -> Result<String, Failure> {
    if !force {
        return Err(Failure::new(exit::USAGE, WHY_FORCE));
    }
    let client = super::connect(
        server,
        access,
        &format!("pklock release {name}"),
        StopTime::Exactly(Duration::ZERO),
    )?;
    match client.force_release(name) {
        Ok(ForceRelease::Closed(holders)) => {
            let mut out = String::new();
            for holder in holders {
                out += &format!(
                    "released {name:?}: closed connection {} of {:?} from {}\n",
                    holder.conn, holder.client, holder.peer
                );
            }
            Ok(out)
        }
        Ok(ForceRelease::NotHeld) => Err(Failure::new(
            exit::CONFLICT,
            format!("nobody holds {name:?}: nothing to release"),
        )),
        Err(e) => Err(super::report::query_failed("release", e)),
    }
}
