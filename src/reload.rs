//! Reloading the configuration while running (SIGHUP): which keys take
//! effect at once and which only at the next start. No sockets: the event
//! loop applies the configuration this returns.

use crate::config::Config;

/// A re-read configuration, split into what applies now and what waits.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration to run with: the file's live keys, and the running
    /// values of the keys that need a restart.
    pub config: Config,
    /// The restart-only keys the file changes, each with the value that
    /// stays in effect, for the log.
    pub needs_restart: Vec<String>,
}

/// Splits `read` (the file as it is now, its state file located) against
/// the `running` configuration. `listen`, `state_file` and
/// `restart_grace_ms` need a restart: the listeners are bound, the state
/// file is open with its ceiling reserved, and the grace only counts at a
/// start. Everything else (`allowed`, the limits, `log_level`, and
/// `[keepalive]` for connections accepted from now on) applies at once.
pub fn merge(running: &Config, read: Config) -> Reloaded {
    let mut needs_restart = Vec::new();
    if read.listen != running.listen {
        let listen: Vec<String> = running.listen.iter().map(ToString::to_string).collect();
        let listen = if listen.is_empty() {
            "none".to_string()
        } else {
            listen.join(", ")
        };
        needs_restart.push(format!("`listen` (still {listen})"));
    }
    if read.state_file != running.state_file {
        needs_restart.push(format!(
            "`state_file` (still {})",
            running
                .state_file
                .as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        ));
    }
    if read.restart_grace_ms != running.restart_grace_ms {
        needs_restart.push(format!(
            "`restart_grace_ms` (still {})",
            running
                .restart_grace_ms
                .map_or("the default".to_string(), |ms| ms.to_string())
        ));
    }
    if read.cluster != running.cluster {
        needs_restart.push("`[cluster]`".to_string());
    }
    if read.metrics_listen != running.metrics_listen {
        needs_restart.push("`metrics_listen`".to_string());
    }
    if read.log_format != running.log_format {
        needs_restart.push("`log_format`".to_string());
    }
    // The TLS listeners are bound; their certificate, key and client CA are
    // read again on every reload.
    let tls = match (&running.tls, read.tls.clone()) {
        (Some(running_tls), Some(read_tls)) => {
            if read_tls.listen != running_tls.listen {
                needs_restart.push("`[tls] listen`".to_string());
            }
            Some(crate::config::TlsConfig {
                listen: running_tls.listen.clone(),
                ..read_tls
            })
        }
        (None, None) => None,
        (running_tls, _) => {
            needs_restart.push(format!(
                "`[tls]` (still {})",
                if running_tls.is_some() { "on" } else { "off" }
            ));
            running_tls.clone()
        }
    };
    Reloaded {
        config: Config {
            tls,
            metrics_listen: running.metrics_listen.clone(),
            log_format: running.log_format,
            listen: running.listen.clone(),
            cluster: running.cluster.clone(),
            state_file: running.state_file.clone(),
            restart_grace_ms: running.restart_grace_ms,
            ..read
        },
        needs_restart,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn live_keys_apply_and_nothing_is_refused() {
        let running = parse("");
        let read = parse(
            "allowed = [\"10.0.0.0/8\"]\nmax_connections = 5\nlog_level = \"debug\"\n\
             [keepalive]\nidle_ms = 2000\n",
        );
        let reloaded = merge(&running, read.clone());
        assert_eq!(reloaded.config, read);
        assert!(reloaded.needs_restart.is_empty());
    }

    #[test]
    fn restart_only_keys_keep_their_running_values_and_are_named() {
        let running = parse("listen = [\"127.0.0.1:1\"]\nstate_file = \"/a\"\n");
        let read = parse(
            "listen = [\"127.0.0.1:2\"]\nstate_file = \"/b\"\nrestart_grace_ms = 5\n\
             max_connections = 7\n",
        );
        let reloaded = merge(&running, read);
        assert_eq!(reloaded.config.listen, running.listen);
        assert_eq!(reloaded.config.state_file, running.state_file);
        assert_eq!(reloaded.config.restart_grace_ms, None);
        assert_eq!(reloaded.config.max_connections, 7);
        assert_eq!(
            reloaded.needs_restart,
            [
                "`listen` (still 127.0.0.1:1)",
                "`state_file` (still /a)",
                "`restart_grace_ms` (still the default)"
            ]
        );
    }

    #[test]
    fn a_plain_port_added_to_a_tls_only_server_names_none_as_still_in_effect() {
        let tls = "[tls]\nlisten = [\"127.0.0.1:3\"]\ncert_file = \"c\"\nkey_file = \"k\"\n";
        let running = parse(&format!("listen = []\n{tls}"));
        let read = parse(&format!("listen = [\"127.0.0.1:4\"]\n{tls}"));
        let reloaded = merge(&running, read);
        assert!(reloaded.config.listen.is_empty());
        assert_eq!(reloaded.needs_restart, ["`listen` (still none)"]);
    }
}
