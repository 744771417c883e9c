//! The server's log: `RUST_LOG`'s filter (default `info`), unless the
//! configuration's `log_level` overrides it for every line. The override can
//! change while the server runs, so a reload can turn debugging on and off.
//! Lines are env_logger's text, or one JSON object each (`log_format`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::io::Write as _;

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogFormat;

/// The override in force: 0 for none, else the level's position plus one.
static OVERRIDE: AtomicUsize = AtomicUsize::new(0);
/// The most `RUST_LOG`'s filter lets through, once the logger is installed.
static FROM_ENV_MAX: OnceLock<LevelFilter> = OnceLock::new();

const LEVELS: [LevelFilter; 6] = [
    LevelFilter::Off,
    LevelFilter::Error,
    LevelFilter::Warn,
    LevelFilter::Info,
    LevelFilter::Debug,
    LevelFilter::Trace,
];

/// Two env_logger loggers writing alike: one filtered by `RUST_LOG`, one
/// letting everything through for the override to filter.
struct Switchable {
    from_env: env_logger::Logger,
    every: env_logger::Logger,
}

fn override_level() -> Option<LevelFilter> {
    let stored = OVERRIDE.load(Ordering::Relaxed);
    stored.checked_sub(1).and_then(|i| LEVELS.get(i)).copied()
}

impl Log for Switchable {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        match override_level() {
            Some(level) => metadata.level() <= level,
            None => self.from_env.enabled(metadata),
        }
    }

    fn log(&self, record: &Record<'_>) {
        match override_level() {
            Some(level) if record.level() <= level => self.every.log(record),
            Some(_) => {}
            None => self.from_env.log(record),
        }
    }

    fn flush(&self) {
        self.from_env.flush();
        self.every.flush();
    }
}

/// Installs the process's logger, at `configured` if set, else as
/// `RUST_LOG` says (default `info`), writing text lines. Once per process.
pub fn install(configured: Option<LevelFilter>) -> Result<(), log::SetLoggerError> {
    install_as(configured, LogFormat::Text)
}

/// Like [`install`], writing lines in `format`.
pub fn install_as(
    configured: Option<LevelFilter>,
    format: LogFormat,
) -> Result<(), log::SetLoggerError> {
    let mut from_env =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // Not from RUST_LOG: with an override, the override alone decides.
    let mut every = env_logger::Builder::new();
    every.filter_level(LevelFilter::Trace);
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        every.parse_write_style(&style);
    }
    if format == LogFormat::Json {
        from_env.format(json_line);
        every.format(json_line);
    }
    let from_env = from_env.build();
    let every = every.build();
    let from_env_max = from_env.filter();
    log::set_boxed_logger(Box::new(Switchable { from_env, every }))?;
    let _ = FROM_ENV_MAX.set(from_env_max);
    set(configured);
    Ok(())
}

/// One log record as a line of JSON, for log shippers: `ts` (RFC 3339,
/// UTC, milliseconds), `level`, `target` and `msg`.
fn json_line(buf: &mut env_logger::fmt::Formatter, record: &Record<'_>) -> std::io::Result<()> {
    let line = serde_json::json!({
        "ts": buf.timestamp_millis().to_string(),
        "level": record.level().as_str(),
        "target": record.target(),
        "msg": record.args().to_string(),
    });
    writeln!(buf, "{line}")
}

/// Makes `configured` the level from now on; `None` hands the choice back
/// to `RUST_LOG`. Does nothing before [`install`] (a server embedded in
/// another program leaves that program's logger alone).
pub fn set(configured: Option<LevelFilter>) {
    let Some(&from_env_max) = FROM_ENV_MAX.get() else {
        return;
    };
    let stored = configured.map_or(0, |level| level as usize + 1);
    OVERRIDE.store(stored, Ordering::Relaxed);
    log::set_max_level(configured.unwrap_or(from_env_max));
}
