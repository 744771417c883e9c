//! Where the token state file lives when the configuration names none:
//! systemd's `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/pklock`, else
//! `~/.local/state/pklock`, in a file named after the first listen port.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The environment variables the default place depends on, passed in so
/// that the choice can be tested without changing the process environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDirs {
    /// `$STATE_DIRECTORY`: set by systemd's `StateDirectory=`, possibly
    /// several paths separated by colons.
    pub state_directory: Option<OsString>,
    /// `$XDG_STATE_HOME`.
    pub xdg_state_home: Option<OsString>,
    /// `$HOME`.
    pub home: Option<OsString>,
}

/// What the state file came to, for the log and `--check-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// The configuration names the file.
    Configured,
    /// `state_file = ""`: none, tokens are clock-based.
    TurnedOff,
    /// The configuration names none: the default place, this directory
    /// (created at start if missing).
    DefaultPlace(PathBuf),
    /// The configuration names none and the first listen port is 0: none.
    EphemeralPort,
    /// Cluster mode: the token ceiling and the grant key live in etcd, and
    /// any `state_file` is not used.
    InEtcd,
}

impl StateDirs {
    /// The variables as this process sees them.
    pub fn from_env() -> StateDirs {
        StateDirs {
            state_directory: std::env::var_os("STATE_DIRECTORY"),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            home: std::env::var_os("HOME"),
        }
    }

    /// The directory for a default state file: the first path of
    /// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/pklock`, else
    /// `$HOME/.local/state/pklock`. Empty and relative values are passed
    /// over, as the XDG base directory specification asks: a relative path
    /// would name a different place for every working directory.
    pub fn default_dir(&self) -> Option<PathBuf> {
        let absolute = |value: &OsStr| Some(PathBuf::from(value)).filter(|p| p.is_absolute());
        let systemd = self.state_directory.as_deref().and_then(|paths| {
            let first = paths.as_bytes().split(|&b| b == b':').next()?;
            absolute(OsStr::from_bytes(first))
        });
        systemd
            .or_else(|| {
                self.xdg_state_home
                    .as_deref()
                    .and_then(absolute)
                    .map(|dir| dir.join("pklock"))
            })
            .or_else(|| {
                self.home
                    .as_deref()
                    .and_then(absolute)
                    .map(|home| home.join(".local/state/pklock"))
            })
    }
}

/// The default state file's name for a server whose first listen address
/// is `addr`: `state-20934`. Keyed by the port only, so that a server moved
/// from 127.0.0.1 to 0.0.0.0 on the same port (the usual step from a trial
/// to a network service) keeps its state, and with it its holders' locks
/// across that restart; two servers of one account cannot share a port.
/// None for port 0.
///
/// Port 0 gets no default file. The state file speaks for "the previous run
/// of this server", and a server on a port picked by the kernel has no
/// identity across runs: keyed by the port it was given, an unrelated later
/// server that happens to get the same port would take this run's state for
/// its own, and every run would leave one more file behind.
pub fn file_name(addr: SocketAddr) -> Option<String> {
    match addr.port() {
        0 => None,
        port => Some(format!("{PREFIX}{port}")),
    }
}

/// How default state files are named: this, then the port.
pub const PREFIX: &str = "state-";

/// Turns `state_file` as read (absent, `""` or a path) into the file to use:
/// absent means the default place for the first listen address.
pub fn locate(mut config: Config, dirs: &StateDirs) -> Result<(Config, Located), String> {
    if config.cluster.is_some() {
        config.state_file = None;
        return Ok((config, Located::InEtcd));
    }
    match &config.state_file {
        Some(path) if path.as_os_str().is_empty() => {
            config.state_file = None;
            Ok((config, Located::TurnedOff))
        }
        Some(_) => Ok((config, Located::Configured)),
        None => {
            let Some(name) = config.first_listen().and_then(file_name) else {
                return Ok((config, Located::EphemeralPort));
            };
            let dir = dirs.default_dir().ok_or_else(|| {
                "no place for the state file: none of STATE_DIRECTORY, XDG_STATE_HOME and HOME \
                 is set to an absolute path; set state_file in the configuration, or \
                 state_file = \"\" to keep fencing tokens clock-based"
                    .to_string()
            })?;
            config.state_file = Some(dir.join(name));
            Ok((config, Located::DefaultPlace(dir)))
        }
    }
}

/// Makes the default directory ready: creates it (mode 0700) if missing
/// and checks that a file can be created in it.
pub fn prepare(dir: &Path) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "the default place for the state file, {}, {what}: {e}; set state_file in the \
             configuration to a writable path, or state_file = \"\" to keep fencing tokens \
             clock-based",
            dir.display()
        )
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail("cannot be created", e))?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| fail("cannot be written", e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(state_directory: Option<&str>, xdg: Option<&str>, home: Option<&str>) -> StateDirs {
        StateDirs {
            state_directory: state_directory.map(OsString::from),
            xdg_state_home: xdg.map(OsString::from),
            home: home.map(OsString::from),
        }
    }

    #[test]
    fn systemd_first_then_xdg_then_home() {
        let all = dirs(
            Some("/var/lib/pklock:/var/lib/other"),
            Some("/x"),
            Some("/h"),
        );
        assert_eq!(all.default_dir(), Some(PathBuf::from("/var/lib/pklock")));
        let xdg = dirs(None, Some("/x"), Some("/h"));
        assert_eq!(xdg.default_dir(), Some(PathBuf::from("/x/pklock")));
        let home = dirs(None, None, Some("/h"));
        assert_eq!(
            home.default_dir(),
            Some(PathBuf::from("/h/.local/state/pklock"))
        );
        assert_eq!(dirs(None, None, None).default_dir(), None);
    }

    #[test]
    fn empty_and_relative_values_are_passed_over() {
        let d = dirs(Some(""), Some("relative"), Some("/h"));
        assert_eq!(
            d.default_dir(),
            Some(PathBuf::from("/h/.local/state/pklock"))
        );
        let d = dirs(Some(":/second"), None, None);
        assert_eq!(d.default_dir(), None);
    }

    #[test]
    fn file_names_are_keyed_by_the_port() {
        let name = |a: &str| file_name(a.parse().unwrap());
        assert_eq!(name("127.0.0.1:20934").as_deref(), Some("state-20934"));
        assert_eq!(
            name("0.0.0.0:20934"),
            name("127.0.0.1:20934"),
            "moved to the network, same state"
        );
        assert_eq!(name("[::1]:20935").as_deref(), Some("state-20935"));
        assert_eq!(name("127.0.0.1:0"), None);
    }

    fn located(text: &str, d: &StateDirs) -> (Option<PathBuf>, Located) {
        let (config, how) = locate(Config::parse(text).unwrap(), d).unwrap();
        (config.state_file, how)
    }

    #[test]
    fn absent_means_the_default_place_for_the_first_address() {
        let d = dirs(None, Some("/x"), Some("/h"));
        assert_eq!(
            located("", &d),
            (
                Some(PathBuf::from("/x/pklock/state-20934")),
                Located::DefaultPlace(PathBuf::from("/x/pklock"))
            )
        );
        assert_eq!(
            located("listen = [\"[::]:7000\", \"0.0.0.0:7000\"]", &d).0,
            Some(PathBuf::from("/x/pklock/state-7000"))
        );
    }

    #[test]
    fn empty_turns_it_off_and_a_path_is_kept() {
        let d = dirs(None, Some("/x"), None);
        assert_eq!(located("state_file = \"\"", &d), (None, Located::TurnedOff));
        assert_eq!(
            located("state_file = \"/srv/tokens\"", &d),
            (Some(PathBuf::from("/srv/tokens")), Located::Configured)
        );
    }

    #[test]
    fn port_zero_gets_no_default_file() {
        let d = dirs(None, Some("/x"), None);
        assert_eq!(
            located("listen = [\"127.0.0.1:0\"]", &d),
            (None, Located::EphemeralPort)
        );
    }

    #[test]
    fn no_place_at_all_is_an_error_that_says_how_to_go_on() {
        let e = locate(Config::default(), &StateDirs::default()).unwrap_err();
        assert!(e.contains("state_file = \"\""), "{e}");
    }
}
