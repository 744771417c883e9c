//! The wire messages of docs/PROTOCOL.md: a frame body parsed into a
//! [`Request`] (or a [`BadRequest`] saying what answer it gets), and the
//! [`Reply`] values with their exact JSON. The one place serde_json is used.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::frame;
use crate::lock_table::{Mode, Permits};

/// The longest lock name, in bytes of UTF-8.
pub const MAX_LOCK_NAME_BYTES: usize = 1024;
/// The longest client name given in `hello`, in bytes of UTF-8.
pub const MAX_CLIENT_NAME_BYTES: usize = 256;
/// The longest `auth` token given in `hello`, in bytes of UTF-8.
pub const MAX_AUTH_BYTES: usize = 1024;
/// The longest `id`, in bytes of its JSON text as sent (quotes and escapes
/// included). A waiting request keeps its id until it is answered, so this
/// bounds what each wait can make the server store; clients send small
/// numbers or short strings.
pub const MAX_ID_BYTES: usize = 256;
/// Locks listed by `status` when no `limit` is given.
pub const DEFAULT_STATUS_LIMIT: usize = 1000;
/// The largest `limit` `status` takes.
pub const MAX_STATUS_LIMIT: usize = 100_000;
/// The protocol version this server speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// Longest piece of peer input quoted back in an error.
const QUOTE_BYTES: usize = 128;

/// A lock request's claim to a grant of an earlier run: the grant's token
/// and the proof the server sent with it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReclaimClaim {
    /// The grant's fencing token.
    pub token: u64,
    /// The `proof` of the grant.
    pub proof: String,
}

/// An RPC id: any JSON scalar, kept as the exact text the peer sent so that
/// it is echoed verbatim.
pub type RequestId = Box<RawValue>;

/// A well-formed request; names without escapes borrow from the frame.
#[derive(Debug)]
pub enum Request<'a> {
    /// Ask for a lock.
    Lock {
        /// The RPC id.
        id: RequestId,
        /// The lock's name.
        lock: Cow<'a, str>,
        /// `None` waits for ever; zero tries once.
        timeout: Option<Duration>,
        /// Exclusive or shared.
        mode: Mode,
        /// For a semaphore: its permits, and how many to take.
        semaphore: Option<Permits>,
        /// A grant of an earlier run to have back, instead of a new one.
        reclaim: Option<ReclaimClaim>,
    },
    /// Ask for several locks at once (`lockNames`).
    LockAll {
        /// The RPC id.
        id: RequestId,
        /// The locks, each with its mode, no name twice.
        locks: NamedLocks<'a>,
        /// `None` waits for ever; zero tries once.
        timeout: Option<Duration>,
    },
    /// Give up several locks, or a wait for them (`lockNames`).
    UnlockAll {
        /// The RPC id.
        id: RequestId,
        /// The locks.
        locks: Vec<Cow<'a, str>>,
    },
    /// Give up a lock, or a wait for one.
    Unlock {
        /// Which form of reply the peer expects.
        form: UnlockForm,
        /// The lock's name.
        lock: Cow<'a, str>,
    },
    /// Name the client and learn the server's settings.
    Hello {
        /// The RPC id.
        id: RequestId,
        /// The name `status` shows for this connection.
        client: String,
        /// A secret token naming the principal the connection acts for.
        auth: Option<String>,
        /// A grant (lock name, token) whose holder runs this connection's
        /// client: the holder waits for whatever this connection waits for.
        within: Option<(String, u64)>,
    },
    /// Close the connection of every holder of a lock (admin only).
    ForceRelease {
        /// The RPC id.
        id: RequestId,
        /// The lock's name.
        lock: Cow<'a, str>,
    },
    /// Check that the server answers.
    Ping {
        /// The RPC id.
        id: RequestId,
    },
    /// List locks with their holders and waiters.
    Status {
        /// The RPC id.
        id: RequestId,
        /// Which locks.
        filter: StatusFilter,
        /// At most this many locks.
        limit: usize,
        /// Only locks whose names sort after this one: the next page after
        /// a reply cut short.
        after: Option<String>,
    },
    /// Server counters.
    Stats {
        /// The RPC id.
        id: RequestId,
    },
}

/// The two forms of unlock.
#[derive(Debug)]
pub enum UnlockForm {
    /// The original client's plain message, answered with `attempted`/`result`
    /// and the name echoed exactly as sent.
    V1 {
        /// `lockName` as the peer spelled it.
        lock_name: Box<RawValue>,
    },
    /// An RPC, answered by id.
    Rpc {
        /// The RPC id.
        id: RequestId,
    },
}

/// Which locks `status` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusFilter {
    /// Every lock.
    All,
    /// The one lock of this name.
    Exact(String),
    /// Locks whose names start with this.
    Prefix(String),
}

/// A message that cannot be carried out, and the answer it gets.
#[derive(Debug)]
pub enum BadRequest {
    /// Not UTF-8 JSON, or not an object.
    InvalidJson(String),
    /// Not a request: no command, a command that is not a string, no id
    /// where one is needed.
    InvalidRequest {
        /// The id, echoed when the message had a usable one.
        id: Option<RequestId>,
        /// What is wrong.
        detail: String,
    },
    /// A request whose parameters are wrong, or an unknown command: answered
    /// by id with status `invalid`.
    Invalid {
        /// The RPC id.
        id: RequestId,
        /// What is wrong.
        error: String,
    },
    /// A v1 unlock without a usable `lockName`.
    InvalidV1Unlock(String),
}

impl BadRequest {
    /// What went wrong, for the log.
    pub fn detail(&self) -> &str {
        match self {
            BadRequest::InvalidJson(detail)
            | BadRequest::InvalidRequest { detail, .. }
            | BadRequest::Invalid { error: detail, .. }
            | BadRequest::InvalidV1Unlock(detail) => detail,
        }
    }

    /// The answer the peer gets.
    pub fn into_reply(self) -> Reply {
        match self {
            BadRequest::InvalidJson(detail) => Reply::error(ErrorCode::InvalidJson, detail),
            BadRequest::InvalidRequest { id, detail } => Reply::Error {
                error: ErrorCode::InvalidRequest,
                detail: Some(detail),
                limit: None,
                id,
            },
            BadRequest::Invalid { id, error } => Reply::Rpc {
                id,
                result: Outcome::Invalid(error),
            },
            BadRequest::InvalidV1Unlock(_) => Reply::Unlock {
                result: UnlockResult::Invalid,
                lock_name: None,
            },
        }
    }
}

/// The top-level keys of any message, read in one pass. Values stay raw
/// until the command is known, so each can be checked with a precise answer.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    command: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    parameters: Option<ParamsField<'a>>,
    #[serde(borrow, rename = "lockName")]
    lock_name: Option<&'a RawValue>,
}

/// `parameters` as it came: an object read in the envelope's pass (its
/// values kept raw), or something else, named for the error.
// Lives on the stack for one parse; a box would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum ParamsField<'a> {
    Object(Parameters<'a>),
    Other(&'static str),
}

#[derive(Default)]
struct Parameters<'a> {
    lock_name: Option<&'a RawValue>,
    timeout_ms: Option<&'a RawValue>,
    mode: Option<&'a RawValue>,
    client: Option<&'a RawValue>,
    prefix: Option<&'a RawValue>,
    limit: Option<&'a RawValue>,
    after: Option<&'a RawValue>,
    reclaim: Option<&'a RawValue>,
    auth: Option<&'a RawValue>,
    lock_names: Option<&'a RawValue>,
    within: Option<&'a RawValue>,
    permits: Option<&'a RawValue>,
    take: Option<&'a RawValue>,
    /// A key read here that came twice (the first value is kept).
    duplicate: Option<&'static str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for ParamsField<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParamsVisitor)
    }
}

struct ParamsVisitor;

impl<'de> Visitor<'de> for ParamsVisitor {
    type Value = ParamsField<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a parameters object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut params = Parameters::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let (slot, name) = match key.as_ref() {
                "lockName" => (&mut params.lock_name, "lockName"),
                "timeoutMs" => (&mut params.timeout_ms, "timeoutMs"),
                "mode" => (&mut params.mode, "mode"),
                "client" => (&mut params.client, "client"),
                "prefix" => (&mut params.prefix, "prefix"),
                "limit" => (&mut params.limit, "limit"),
                "after" => (&mut params.after, "after"),
                "reclaim" => (&mut params.reclaim, "reclaim"),
                "auth" => (&mut params.auth, "auth"),
                "lockNames" => (&mut params.lock_names, "lockNames"),
                "within" => (&mut params.within, "within"),
                "permits" => (&mut params.permits, "permits"),
                "take" => (&mut params.take, "take"),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let value = map.next_value::<&'de RawValue>()?;
            if slot.is_some() {
                params.duplicate.get_or_insert(name);
            } else {
                *slot = Some(value);
            }
        }
        Ok(ParamsField::Object(params))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(ParamsField::Object(Parameters::default()))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(ParamsField::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(ParamsField::Other("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(ParamsField::Other("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(ParamsField::Other("a number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(ParamsField::Other("a string"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(ParamsField::Other("an array"))
    }
}

/// Parses one frame body.
pub fn parse(body: &[u8]) -> Result<Request<'_>, BadRequest> {
    let text = std::str::from_utf8(body).map_err(|e| {
        BadRequest::InvalidJson(format!(
            "not UTF-8: invalid byte at offset {}",
            e.valid_up_to()
        ))
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(BadRequest::InvalidJson(format!(
            "expected a JSON object, got {}",
            quote(text.trim())
        )));
    }
    let envelope: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| BadRequest::InvalidJson(e.to_string()))?;

    let id = match envelope.id.filter(|raw| !is_null(raw)) {
        None => None,
        Some(raw) if raw.get().len() > MAX_ID_BYTES => {
            return Err(BadRequest::InvalidRequest {
                id: None,
                detail: format!(
                    "id is {} bytes of JSON, the limit is {MAX_ID_BYTES}",
                    raw.get().len()
                ),
            });
        }
        Some(raw) if is_scalar(raw) => Some(raw.to_owned()),
        Some(raw) => {
            return Err(BadRequest::InvalidRequest {
                id: None,
                detail: format!(
                    "id must be a string, number or boolean, got {}",
                    quote(raw.get())
                ),
            });
        }
    };
    let invalid_request =
        |id: Option<RequestId>, detail: String| BadRequest::InvalidRequest { id, detail };
    let Some(command_raw) = envelope.command else {
        return Err(invalid_request(id, "missing `command`".to_string()));
    };
    let Some(command) = as_str(command_raw) else {
        return Err(invalid_request(
            id,
            format!(
                "`command` must be a string, got {}",
                quote(command_raw.get())
            ),
        ));
    };

    if command == "unlock" && id.is_none() {
        return parse_v1_unlock(envelope.lock_name);
    }
    let Some(id) = id else {
        let detail = match command.as_ref() {
            "lock" | "hello" | "ping" | "status" | "stats" | "forceRelease" => {
                format!("`{command}` is an RPC and needs an `id`")
            }
            _ => format!("unknown command {}", quote(&command)),
        };
        return Err(invalid_request(None, detail));
    };
    if command == "lock" && envelope.parameters.is_none() {
        return Err(invalid_request(
            Some(id),
            "`lock` needs `parameters`".to_string(),
        ));
    }
    let params = match parse_parameters(envelope.parameters) {
        Ok(params) => params,
        Err(error) => return Err(BadRequest::Invalid { id, error }),
    };
    if params.lock_names.is_some_and(|raw| !is_null(raw)) {
        let request = match command.as_ref() {
            "lock" => parse_lock_all(&params).map(|(locks, timeout)| Request::LockAll {
                id: id.clone(),
                locks,
                timeout,
            }),
            "unlock" => parse_unlock_all(&params).map(|locks| Request::UnlockAll {
                id: id.clone(),
                locks,
            }),
            _ => Err(format!("`{command}` takes no `lockNames`")),
        };
        return request.map_err(|error| BadRequest::Invalid { id, error });
    }
    let checked = match command.as_ref() {
        "lock" => parse_lock(&params),
        "unlock" => {
            // An RPC unlock names its lock in `parameters`; the top-level key
            // of the v1 form is taken too.
            lock_name(params.lock_name.or(envelope.lock_name))
                .map(|lock| (lock, None, Mode::Exclusive))
        }
        "forceRelease" => lock_name(params.lock_name).map(|lock| (lock, None, Mode::Exclusive)),
        "hello" | "ping" | "status" | "stats" => Ok((Cow::Borrowed(""), None, Mode::Exclusive)),
        _ => Err(format!("unknown command {}", quote(&command))),
    };
    let (lock, timeout, mode) = match checked {
        Ok(parts) => parts,
        Err(error) => return Err(BadRequest::Invalid { id, error }),
    };
    let request = match command.as_ref() {
        "lock" => match reclaim_claim(&params).and_then(|reclaim| {
            semaphore(&params)
                .map(|semaphore| (reclaim, semaphore))
                .map_err(|e| e.to_string())
        }) {
            Ok((reclaim, semaphore)) => Request::Lock {
                id,
                lock,
                timeout,
                mode,
                semaphore,
                reclaim,
            },
            Err(error) => return Err(BadRequest::Invalid { id, error }),
        },
        "unlock" => Request::Unlock {
            form: UnlockForm::Rpc { id },
            lock,
        },
        "hello" => match client_name(params.client).and_then(|client| {
            let auth = auth_token(params.auth)?;
            Ok((client, auth, within(params.within)?))
        }) {
            Ok((client, auth, within)) => Request::Hello {
                id,
                client,
                auth,
                within,
            },
            Err(error) => return Err(BadRequest::Invalid { id, error }),
        },
        "forceRelease" => Request::ForceRelease { id, lock },
        "ping" => Request::Ping { id },
        "stats" => Request::Stats { id },
        _ => match status_params(&params) {
            Ok((filter, limit, after)) => Request::Status {
                id,
                filter,
                limit,
                after,
            },
            Err(error) => return Err(BadRequest::Invalid { id, error }),
        },
    };
    Ok(request)
}

fn parse_v1_unlock(lock_name_raw: Option<&RawValue>) -> Result<Request<'_>, BadRequest> {
    match (lock_name(lock_name_raw), lock_name_raw) {
        (Ok(lock), Some(raw)) => Ok(Request::Unlock {
            form: UnlockForm::V1 {
                lock_name: raw.to_owned(),
            },
            lock,
        }),
        (Err(detail), _) => Err(BadRequest::InvalidV1Unlock(detail)),
        (Ok(_), None) => Err(BadRequest::InvalidV1Unlock(
            "missing `lockName`".to_string(),
        )),
    }
}

fn parse_parameters(field: Option<ParamsField<'_>>) -> Result<Parameters<'_>, String> {
    match field {
        None => Ok(Parameters::default()),
        Some(ParamsField::Object(params)) => match params.duplicate {
            Some(name) => Err(format!("bad `parameters`: duplicate field `{name}`")),
            None => Ok(params),
        },
        Some(ParamsField::Other(what)) => {
            Err(format!("`parameters` must be an object, got {what}"))
        }
    }
}

type LockParts<'a> = (Cow<'a, str>, Option<Duration>, Mode);

/// The `reclaim` parameter of `lock`, if given.
fn reclaim_claim(params: &Parameters<'_>) -> Result<Option<ReclaimClaim>, String> {
    let Some(raw) = params.reclaim.filter(|raw| !is_null(raw)) else {
        return Ok(None);
    };
    serde_json::from_str::<ReclaimClaim>(raw.get())
        .map(Some)
        .map_err(|_| {
            format!(
                "`reclaim` must be {{\"token\": integer, \"proof\": string}}, got {}",
                quote(raw.get())
            )
        })
}

fn parse_lock<'a>(params: &Parameters<'a>) -> Result<LockParts<'a>, String> {
    lock_parts(params, lock_name(params.lock_name)?)
}

/// `lock` with its `timeoutMs` and `mode`.
fn lock_parts<'a>(params: &Parameters<'a>, lock: Cow<'a, str>) -> Result<LockParts<'a>, String> {
    let timeout = match params.timeout_ms.filter(|raw| !is_null(raw)) {
        None => None,
        Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => {
                return Err(format!(
                    "`timeoutMs` must be an integer >= 0 or null, got {}",
                    quote(raw.get())
                ));
            }
        },
    };
    let mode = match params.mode.filter(|raw| !is_null(raw)) {
        None => Mode::Exclusive,
        Some(raw) => parse_mode(raw)?,
    };
    Ok((lock, timeout, mode))
}

fn parse_mode(raw: &RawValue) -> Result<Mode, String> {
    match as_string(raw).as_deref() {
        Some("exclusive") => Ok(Mode::Exclusive),
        Some("shared") => Ok(Mode::Shared),
        _ => Err(format!(
            "`mode` must be \"exclusive\" or \"shared\", got {}",
            quote(raw.get())
        )),
    }
}

/// The most locks one `lockNames` may name.
pub const MAX_LOCK_NAMES: usize = 64;
/// The most permits a semaphore may have.
pub const MAX_PERMITS: u32 = 1_000_000;

/// `permits` and `take`, if given.
fn semaphore(params: &Parameters<'_>) -> Result<Option<Permits>, String> {
    let number = |raw: Option<&RawValue>, key: &str| -> Result<Option<u32>, String> {
        let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
            return Ok(None);
        };
        match serde_json::from_str::<u32>(raw.get()) {
            Ok(n) if (1..=MAX_PERMITS).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "`{key}` must be an integer from 1 to {MAX_PERMITS}, got {}",
                quote(raw.get())
            )),
        }
    };
    let permits = number(params.permits, "permits")?;
    let take = number(params.take, "take")?;
    match (permits, take) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err("`take` needs `permits`".to_string()),
        (Some(_), _) if params.mode.is_some_and(|raw| !is_null(raw)) => {
            Err("`permits` and `mode` do not go together: a semaphore has no mode".to_string())
        }
        (Some(of), take) => {
            let take = take.unwrap_or(1);
            if take > of {
                return Err(format!("`take` is {take}, more than the {of} permits"));
            }
            Ok(Some(Permits { of, take }))
        }
    }
}

/// Locks, each with its mode.
type NamedLocks<'a> = Vec<(Cow<'a, str>, Mode)>;

/// The parameters of a `lock` with `lockNames`.
fn parse_lock_all<'a>(
    params: &Parameters<'a>,
) -> Result<(NamedLocks<'a>, Option<Duration>), String> {
    for (given, key) in [
        (params.lock_name, "lockName"),
        (params.permits, "permits"),
        (params.take, "take"),
        (params.reclaim, "reclaim"),
    ] {
        if given.is_some_and(|raw| !is_null(raw)) {
            return Err(format!("`lockNames` and `{key}` do not go together"));
        }
    }
    let (_, timeout, mode) = lock_parts(params, Cow::Borrowed(""))?;
    let entries = lock_name_list(params.lock_names)?;
    let mut locks = Vec::with_capacity(entries.len());
    for entry in entries {
        let lock = if as_str(entry).is_some() || !entry.get().trim_start().starts_with('{') {
            (lock_name(Some(entry))?, mode)
        } else {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Entry<'a> {
                #[serde(borrow, rename = "lockName")]
                lock_name: Option<&'a RawValue>,
                #[serde(borrow)]
                mode: Option<&'a RawValue>,
            }
            let parsed: Entry<'a> = serde_json::from_str(entry.get()).map_err(|_| {
                format!(
                    "each of `lockNames` must be a name or {{\"lockName\": name, \"mode\": mode}}, got {}",
                    quote(entry.get())
                )
            })?;
            let mode = match parsed.mode.filter(|raw| !is_null(raw)) {
                None => mode,
                Some(raw) => parse_mode(raw)?,
            };
            (lock_name(parsed.lock_name)?, mode)
        };
        if locks.iter().any(|(name, _)| *name == lock.0) {
            return Err(format!("`lockNames` names {} twice", quote(&lock.0)));
        }
        locks.push(lock);
    }
    Ok((locks, timeout))
}

/// The names of an `unlock` with `lockNames`.
fn parse_unlock_all<'a>(params: &Parameters<'a>) -> Result<Vec<Cow<'a, str>>, String> {
    if params.lock_name.is_some_and(|raw| !is_null(raw)) {
        return Err("`lockNames` and `lockName` do not go together".to_string());
    }
    lock_name_list(params.lock_names)?
        .into_iter()
        .map(|raw| lock_name(Some(raw)))
        .collect()
}

/// `lockNames`: an array of 1 to [`MAX_LOCK_NAMES`] entries.
fn lock_name_list(raw: Option<&RawValue>) -> Result<Vec<&RawValue>, String> {
    let raw = raw.map_or("null", RawValue::get);
    let entries: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| {
        format!(
            "`lockNames` must be an array of lock names, got {}",
            quote(raw)
        )
    })?;
    if entries.is_empty() || entries.len() > MAX_LOCK_NAMES {
        return Err(format!(
            "`lockNames` must name 1 to {MAX_LOCK_NAMES} locks, got {}",
            entries.len()
        ));
    }
    Ok(entries)
}

/// A lock name: a string of 1 to 1024 bytes, or an integer spelled in decimal
/// (the original server treated `5` and `"5"` as one lock).
fn lock_name(raw: Option<&RawValue>) -> Result<Cow<'_, str>, String> {
    let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
        return Err("missing `lockName`".to_string());
    };
    let name = if let Some(name) = as_str(raw) {
        name
    } else if let Ok(n) = serde_json::from_str::<i64>(raw.get()) {
        Cow::Owned(n.to_string())
    } else if let Ok(n) = serde_json::from_str::<u64>(raw.get()) {
        Cow::Owned(n.to_string())
    } else {
        return Err(format!(
            "`lockName` must be a string (or an integer), got {}",
            quote(raw.get())
        ));
    };
    if name.is_empty() {
        return Err("`lockName` is empty".to_string());
    }
    if name.len() > MAX_LOCK_NAME_BYTES {
        return Err(format!(
            "`lockName` is {} bytes, the limit is {MAX_LOCK_NAME_BYTES}",
            name.len()
        ));
    }
    Ok(name)
}

fn client_name(raw: Option<&RawValue>) -> Result<String, String> {
    let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
        return Ok(String::new());
    };
    let Some(name) = as_string(raw) else {
        return Err(format!(
            "`client` must be a string, got {}",
            quote(raw.get())
        ));
    };
    if name.len() > MAX_CLIENT_NAME_BYTES {
        return Err(format!(
            "`client` is {} bytes, the limit is {MAX_CLIENT_NAME_BYTES}",
            name.len()
        ));
    }
    Ok(name)
}

fn auth_token(raw: Option<&RawValue>) -> Result<Option<String>, String> {
    let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
        return Ok(None);
    };
    // The token is a secret: never quoted back.
    let Some(token) = as_string(raw) else {
        return Err("`auth` must be a string".to_string());
    };
    if token.len() > MAX_AUTH_BYTES {
        return Err(format!(
            "`auth` is {} bytes, the limit is {MAX_AUTH_BYTES}",
            token.len()
        ));
    }
    Ok(Some(token))
}

/// `within`: `{"lockName": NAME, "token": T}`, a grant in force.
fn within(raw: Option<&RawValue>) -> Result<Option<(String, u64)>, String> {
    let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Within<'a> {
        #[serde(borrow, rename = "lockName")]
        lock_name: &'a RawValue,
        token: u64,
    }
    let parsed: Within<'_> = serde_json::from_str(raw.get()).map_err(|_| {
        format!(
            "`within` must be {{\"lockName\": name, \"token\": integer}}, got {}",
            quote(raw.get())
        )
    })?;
    let lock = lock_name(Some(parsed.lock_name))?;
    Ok(Some((lock.into_owned(), parsed.token)))
}

fn status_params(params: &Parameters<'_>) -> Result<(StatusFilter, usize, Option<String>), String> {
    let exact = params.lock_name.filter(|raw| !is_null(raw));
    let prefix = params.prefix.filter(|raw| !is_null(raw));
    let filter = match (exact, prefix) {
        (Some(_), Some(_)) => return Err("give `lockName` or `prefix`, not both".to_string()),
        (Some(_), None) => StatusFilter::Exact(lock_name(exact)?.into_owned()),
        (None, Some(raw)) => match as_string(raw) {
            Some(prefix) if prefix.len() <= MAX_LOCK_NAME_BYTES => StatusFilter::Prefix(prefix),
            _ => {
                return Err(format!(
                    "`prefix` must be a string of at most {MAX_LOCK_NAME_BYTES} bytes, got {}",
                    quote(raw.get())
                ));
            }
        },
        (None, None) => StatusFilter::All,
    };
    let limit = match params.limit.filter(|raw| !is_null(raw)) {
        None => DEFAULT_STATUS_LIMIT,
        Some(raw) => match serde_json::from_str::<usize>(raw.get()) {
            Ok(n) if (1..=MAX_STATUS_LIMIT).contains(&n) => n,
            _ => {
                return Err(format!(
                    "`limit` must be an integer from 1 to {MAX_STATUS_LIMIT}, got {}",
                    quote(raw.get())
                ));
            }
        },
    };
    let after = match params.after.filter(|raw| !is_null(raw)) {
        None => None,
        Some(raw) => match as_string(raw) {
            Some(after) if after.len() <= MAX_LOCK_NAME_BYTES => Some(after),
            _ => {
                return Err(format!(
                    "`after` must be a lock name (a string of at most {MAX_LOCK_NAME_BYTES} \
                     bytes), got {}",
                    quote(raw.get())
                ));
            }
        },
    };
    Ok((filter, limit, after))
}

fn as_string(raw: &RawValue) -> Option<String> {
    as_str(raw).map(Cow::into_owned)
}

/// A JSON string's text, borrowed when it has no escapes (the parser has
/// already checked it is a valid string).
fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

fn is_scalar(raw: &RawValue) -> bool {
    !matches!(raw.get().as_bytes().first(), Some(b'[' | b'{'))
}

/// Peer input quoted for an error message, cut at a character boundary.
fn quote(text: &str) -> String {
    let mut end = text.len().min(QUOTE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut quoted = String::with_capacity(end + 8);
    quoted.push('`');
    quoted.push_str(&text[..end]);
    if end < text.len() {
        let _ = write!(quoted, "...");
    }
    quoted.push('`');
    quoted
}

/// The length of `value` as JSON, without building it.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to a counter cannot fail; a value that cannot be encoded counts as nothing.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Every message the server sends.
#[derive(Debug)]
pub enum Reply {
    /// `{"id":ID,"result":{...}}`
    Rpc {
        /// The request's id, verbatim.
        id: RequestId,
        /// The result object.
        result: Outcome,
    },
    /// `{"attempted":"unlock","result":R,"lockName":NAME}`, the v1 unlock answer.
    Unlock {
        /// The result word.
        result: UnlockResult,
        /// The name as the peer spelled it (absent when it was unusable).
        lock_name: Option<Box<RawValue>>,
    },
    /// `{"error":"notLeader","leader":L}`: a standby's answer to every
    /// request but `hello`, `ping` and `stats`; `leader` is where to go
    /// (`null` while there is no leader).
    NotLeader {
        /// The leader's advertised address, if there is one.
        leader: Option<String>,
        /// The id, when the request had one.
        id: Option<RequestId>,
    },
    /// `{"error":E,"detail":...}` for messages that are not requests.
    Error {
        /// The error word.
        error: ErrorCode,
        /// What is wrong.
        detail: Option<String>,
        /// The limit that was passed, where one was.
        limit: Option<usize>,
        /// The id, when the message had a usable one.
        id: Option<RequestId>,
    },
}

impl Reply {
    /// The word of an error answer (an `error`, or a refusing `status`),
    /// for counting; `None` for answers that are not errors.
    pub fn error_word(&self) -> Option<&'static str> {
        match self {
            Reply::Error { error, .. } => Some(error.as_str()),
            Reply::NotLeader { .. } => Some("notLeader"),
            Reply::Unlock {
                result: UnlockResult::Invalid,
                ..
            } => Some("invalid"),
            Reply::Rpc { result, .. } => match result {
                Outcome::Invalid(_) | Outcome::PermitsDiffer { .. } => Some("invalid"),
                Outcome::Deadlock(_) => Some("deadlock"),
                Outcome::TooMany(_) => Some("tooMany"),
                Outcome::Refused(_) => Some("refused"),
                Outcome::Denied => Some("denied"),
                _ => None,
            },
            Reply::Unlock { .. } => None,
        }
    }

    /// An error with a detail and nothing else.
    pub fn error(error: ErrorCode, detail: String) -> Reply {
        Reply::Error {
            error,
            detail: Some(detail),
            limit: None,
            id: None,
        }
    }

    /// The answer to a length prefix over the limit.
    pub fn message_too_large(limit: usize) -> Reply {
        Reply::Error {
            error: ErrorCode::MessageTooLarge,
            detail: None,
            limit: Some(limit),
            id: None,
        }
    }

    /// Appends this reply, framed, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if self.encode_common(out) {
            return;
        }
        if frame::encode_with(out, |buf| serde_json::to_writer(buf, self)).is_err() {
            // Only a reply over 4 GiB could fail; say so rather than send nothing.
            let fallback = Reply::error(ErrorCode::Internal, "reply too large to send".to_string());
            let _ = frame::encode_with(out, |buf| serde_json::to_writer(buf, &fallback));
        }
    }
}

impl Reply {
    /// Writes the replies nearly every request gets (a grant, `ok`, the
    /// other status words, the v1 unlock answer) without going through serde:
    /// the same bytes serde_json writes, in a fraction of the time. Returns
    /// false, writing nothing, for any other reply.
    fn encode_common(&self, out: &mut Vec<u8>) -> bool {
        let result = frame::encode_with(out, |buf| {
            match self {
                Reply::Rpc { id, result } => {
                    let status = match result {
                        Outcome::Granted { .. } | Outcome::Ok => "ok",
                        Outcome::Timeout => "timeout",
                        Outcome::Cancelled => "cancelled",
                        Outcome::NotFound => "notFound",
                        _ => return Err(()),
                    };
                    buf.extend_from_slice(b"{\"id\":");
                    buf.extend_from_slice(id.get().as_bytes());
                    buf.extend_from_slice(b",\"result\":{\"status\":\"");
                    buf.extend_from_slice(status.as_bytes());
                    buf.push(b'"');
                    if let Outcome::Granted { token, proof } = result {
                        buf.extend_from_slice(b",\"token\":");
                        buf.extend_from_slice(itoa::Buffer::new().format(*token).as_bytes());
                        if let Some(proof) = proof {
                            // Hex digits: nothing to escape.
                            buf.extend_from_slice(b",\"proof\":\"");
                            buf.extend_from_slice(proof.as_bytes());
                            buf.push(b'"');
                        }
                    }
                    buf.extend_from_slice(b"}}");
                }
                Reply::Unlock {
                    result,
                    lock_name: Some(name),
                } => {
                    let word = match result {
                        UnlockResult::Ok => "ok",
                        UnlockResult::NotFound => "notFound",
                        UnlockResult::Invalid => return Err(()),
                    };
                    buf.extend_from_slice(b"{\"attempted\":\"unlock\",\"result\":\"");
                    buf.extend_from_slice(word.as_bytes());
                    buf.extend_from_slice(b"\",\"lockName\":");
                    buf.extend_from_slice(name.get().as_bytes());
                    buf.push(b'}');
                }
                _ => return Err(()),
            }
            Ok(())
        });
        result.is_ok()
    }
}

/// The `error` words of [`Reply::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body is not UTF-8 JSON, or not an object.
    InvalidJson,
    /// The message is not a request.
    InvalidRequest,
    /// The length prefix is over the limit; the connection is closed.
    MessageTooLarge,
    /// The server is at `max_connections`; the connection is closed.
    TooManyConnections,
    /// The peer's address is not in `allowed`; the connection is closed.
    Denied,
    /// Plain text came to a TLS listener; the connection is closed.
    TlsRequired,
    /// The `hello` token is not accepted; the connection is closed.
    AuthFailed,
    /// An admin force-released a lock this connection held; it is closed.
    ForceReleased,
    /// The server could not encode a reply.
    Internal,
}

impl ErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalidJson",
            ErrorCode::InvalidRequest => "invalidRequest",
            ErrorCode::MessageTooLarge => "messageTooLarge",
            ErrorCode::TooManyConnections => "tooManyConnections",
            ErrorCode::Denied => "denied",
            ErrorCode::TlsRequired => "tlsRequired",
            ErrorCode::AuthFailed => "authFailed",
            ErrorCode::ForceReleased => "forceReleased",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The `result` words of the v1 unlock answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnlockResult {
    /// Released or withdrawn.
    Ok,
    /// Neither held nor waited for.
    NotFound,
    /// `lockName` missing or unusable.
    Invalid,
}

/// The `result` object of an RPC reply.
#[derive(Debug)]
pub enum Outcome {
    /// `ok` with the grant's fencing token.
    Granted {
        /// The fencing token.
        token: u64,
        /// The grant's proof, for a reclaim after a restart (sent to
        /// connections that said `hello`).
        proof: Option<String>,
    },
    /// `ok` with nothing more.
    Ok,
    /// The wait ran out.
    Timeout,
    /// The wait was withdrawn by unlock.
    Cancelled,
    /// `ok` for a multi-lock, with its one token and each lock's proof.
    GrantedAll {
        /// The fencing token.
        token: u64,
        /// Each lock's proof, by name (sent to connections that said
        /// `hello`).
        proofs: Option<Vec<(String, String)>>,
    },
    /// The wait would close a cycle of waits: refused, not queued.
    Deadlock(Vec<CycleStep>),
    /// A semaphore request that disagrees with the permits in force (or a
    /// mutex request on a semaphore, with the permits in force named).
    PermitsDiffer {
        /// What is wrong.
        error: String,
        /// The permits in force.
        permits: u32,
    },
    /// Nothing to unlock.
    NotFound,
    /// Bad parameters.
    Invalid(String),
    /// A configured limit was hit.
    TooMany(String),
    /// A reclaim that is not honoured.
    Refused(String),
    /// Outside the caller's rights; says nothing about what exists.
    Denied,
    /// The `forceRelease` answer: the holders whose connections were closed.
    Closed(Vec<ClosedHolder>),
    /// The `hello` answer.
    Hello(Box<HelloResult>),
    /// The `status` answer.
    Status(Box<StatusResult>),
    /// The `stats` answer.
    Stats(Box<StatsResult>),
}

/// A holder whose connection `forceRelease` closed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClosedHolder {
    /// Its connection id, as `status` shows it.
    pub conn: u64,
    /// Its `hello` name.
    pub client: String,
    /// Its address.
    pub peer: String,
}

/// What `hello` tells a client.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloResult {
    /// The server's name and version.
    pub server: ServerName,
    /// The protocol version.
    pub protocol: u32,
    /// This connection's id, as `status` shows it.
    pub conn: u64,
    /// Keepalive as the kernel applies it.
    pub keepalive: KeepaliveInfo,
    /// The longest the server keeps a silent, vanished peer's locks (with
    /// nothing in flight to it).
    pub release_after_ms: u64,
    /// The soonest it may release them, counted from the last exchange.
    pub earliest_release_ms: u64,
    /// How much longer the server grants no lock, after a restart (0: it grants).
    #[serde(default)]
    pub grants_resume_in_ms: u64,
    /// How much longer the server gives back grants of its previous run to
    /// holders that reclaim them (0: it does not, or no longer).
    #[serde(default)]
    pub reclaim_for_ms: u64,
    /// In cluster mode: this server's role and the leader it knows of.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRole>,
    /// Whom the connection acts for: the name its token or certificate
    /// gave, or `anonymous`.
    #[serde(default = "anonymous")]
    pub principal: String,
}

fn anonymous() -> String {
    ANONYMOUS.to_string()
}

/// The principal of a connection that gave no token and no certificate.
pub const ANONYMOUS: &str = "anonymous";

/// A cluster member's role, as `hello` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterRole {
    /// `leader` or `standby`.
    pub role: Role,
    /// The leader's advertised address (`null` while there is none).
    pub leader: Option<String>,
}

/// Whether a cluster member serves locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// It holds the leadership in etcd and serves every request.
    Leader,
    /// It answers `notLeader` to everything but `hello`, `ping` and `stats`.
    Standby,
}

/// Name and version.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerName {
    /// Always `pklock`.
    pub name: String,
    /// The crate version.
    pub version: String,
}

/// Keepalive settings in effect.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeepaliveInfo {
    /// Silence before the first probe.
    pub idle_ms: u64,
    /// Time between probes.
    pub interval_ms: u64,
    /// Probes before giving up.
    pub probes: u32,
    /// TCP_USER_TIMEOUT, 0 when not set.
    pub user_timeout_ms: u64,
}

/// What `status` lists.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatusResult {
    /// Locks in name order.
    pub locks: Vec<LockStatus>,
    /// Whether the list was cut short.
    pub truncated: bool,
}

/// One lock in `status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockStatus {
    /// The lock's name.
    pub lock_name: String,
    /// For a semaphore: how many permits it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Who holds it.
    pub holders: Vec<HolderStatus>,
    /// Who waits for it, head first.
    pub waiters: Vec<WaiterStatus>,
}

/// A holder in `status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HolderStatus {
    /// The connection's id.
    pub conn: u64,
    /// The name it gave in `hello`.
    pub client: String,
    /// Its address.
    pub peer: String,
    /// `exclusive` or `shared`.
    pub mode: Mode,
    /// The grant's fencing token.
    pub token: u64,
    /// For a semaphore: how many permits it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take: Option<u32>,
    /// How long it has held the lock.
    pub held_ms: u64,
}

/// A waiter in `status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaiterStatus {
    /// The connection's id.
    pub conn: u64,
    /// The name it gave in `hello`.
    pub client: String,
    /// Its address.
    pub peer: String,
    /// `exclusive` or `shared`.
    pub mode: Mode,
    /// For a semaphore: how many permits it asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take: Option<u32>,
    /// How long it has waited.
    pub waiting_ms: u64,
}

/// One step of a deadlock: a connection, and the lock it waits for, which
/// the next step's connection holds or waits for ahead of it (the last
/// step's, the first step's connection).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CycleStep {
    /// The connection's id, as `status` shows it.
    pub conn: u64,
    /// The name it gave in `hello`.
    pub client: String,
    /// The lock it waits for.
    pub lock_name: String,
}

/// What `stats` counts.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsResult {
    /// Time since start.
    pub uptime_ms: u64,
    /// Open connections.
    pub connections: usize,
    /// Lock names with a holder or a waiter.
    pub locks: usize,
    /// Grants in force (a shared lock held by three counts three).
    pub locks_held: usize,
    /// Queued requests.
    pub waiters: usize,
    /// Requests the lock table keeps, at most `max_lock_entries`: grants in
    /// force, queued requests, and waits of closed connections not yet
    /// cleared (a new request clears one to make room if need be).
    #[serde(default)]
    pub lock_entries: usize,
    /// Grants since start.
    pub grants: u64,
    /// Requests that ran out of time since start.
    pub timeouts: u64,
    /// Locks released because their holder's connection closed.
    pub released_by_disconnect: u64,
    /// Connections refused at accept (not allowed, or over a limit).
    pub rejected_connections: u64,
    /// Connections closed because a frame they started, or their first one,
    /// did not arrive whole within `frame_timeout_ms`.
    #[serde(default)]
    pub frame_timeouts: u64,
    /// Messages answered with an error.
    pub bad_messages: u64,
    /// Grants of the previous run given back to their holders.
    #[serde(default)]
    pub reclaims: u64,
    /// Reclaims not honoured (conflicts included).
    #[serde(default)]
    pub reclaims_refused: u64,
    /// Reclaims refused because someone else held the lock: two clients
    /// believed they held it, which honest clients never do.
    #[serde(default)]
    pub reclaim_conflicts: u64,
    /// Locks held at the last clean stop whose holders have not reclaimed
    /// them yet: granted to nobody else until they do, or the window ends.
    #[serde(default)]
    pub awaiting_reclaim: usize,
    /// Lock requests answered `deadlock`.
    #[serde(default)]
    pub deadlocks: u64,
    /// Waits queued without a deadlock check: what they depend on was too
    /// big to look at.
    #[serde(default)]
    pub deadlock_checks_cut: u64,
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reply::Rpc { id, result } => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("id", id)?;
                map.serialize_entry("result", result)?;
                map.end()
            }
            Reply::Unlock { result, lock_name } => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("attempted", "unlock")?;
                let word = match result {
                    UnlockResult::Ok => "ok",
                    UnlockResult::NotFound => "notFound",
                    UnlockResult::Invalid => "invalid",
                };
                map.serialize_entry("result", word)?;
                if let Some(name) = lock_name {
                    map.serialize_entry("lockName", name)?;
                }
                map.end()
            }
            Reply::NotLeader { leader, id } => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("error", "notLeader")?;
                map.serialize_entry("leader", leader)?;
                if let Some(id) = id {
                    map.serialize_entry("id", id)?;
                }
                map.end()
            }
            Reply::Error {
                error,
                detail,
                limit,
                id,
            } => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("error", error.as_str())?;
                if let Some(detail) = detail {
                    map.serialize_entry("detail", detail)?;
                }
                if let Some(limit) = limit {
                    map.serialize_entry("limit", limit)?;
                }
                if let Some(id) = id {
                    map.serialize_entry("id", id)?;
                }
                map.end()
            }
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let simple = |status, token, error| Simple {
            status,
            token,
            proof: None,
            error,
        };
        match self {
            Outcome::Granted { token, proof } => Simple {
                proof: proof.as_deref(),
                ..simple("ok", Some(*token), None)
            }
            .serialize(s),
            Outcome::Ok => simple("ok", None, None).serialize(s),
            Outcome::Timeout => simple("timeout", None, None).serialize(s),
            Outcome::Cancelled => simple("cancelled", None, None).serialize(s),
            Outcome::NotFound => simple("notFound", None, None).serialize(s),
            Outcome::Invalid(error) => simple("invalid", None, Some(error)).serialize(s),
            Outcome::TooMany(error) => simple("tooMany", None, Some(error)).serialize(s),
            Outcome::Refused(error) => simple("refused", None, Some(error)).serialize(s),
            Outcome::Denied => simple("denied", None, None).serialize(s),
            Outcome::GrantedAll { token, proofs } => {
                struct Proofs<'a>(&'a [(String, String)]);
                impl Serialize for Proofs<'_> {
                    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                        s.collect_map(self.0.iter().map(|(name, proof)| (name, proof)))
                    }
                }
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("status", "ok")?;
                map.serialize_entry("token", token)?;
                if let Some(proofs) = proofs {
                    map.serialize_entry("proofs", &Proofs(proofs))?;
                }
                map.end()
            }
            Outcome::Deadlock(cycle) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("status", "deadlock")?;
                map.serialize_entry("cycle", cycle)?;
                map.end()
            }
            Outcome::PermitsDiffer { error, permits } => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("status", "invalid")?;
                map.serialize_entry("error", error)?;
                map.serialize_entry("permits", permits)?;
                map.end()
            }
            Outcome::Closed(closed) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("status", "ok")?;
                map.serialize_entry("closed", closed)?;
                map.end()
            }
            Outcome::Hello(result) => with_status(s, result.as_ref()),
            Outcome::Status(result) => with_status(s, result.as_ref()),
            Outcome::Stats(result) => with_status(s, result.as_ref()),
        }
    }
}

/// A result that is a status word, perhaps with a token or an error.
#[derive(serde::Serialize)]
struct Simple<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proof: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Serializes `{"status":"ok", ...fields of result}`.
fn with_status<S: Serializer, T: Serialize>(s: S, result: &T) -> Result<S::Ok, S::Error> {
    #[derive(serde::Serialize)]
    struct WithStatus<'a, T> {
        status: &'static str,
        #[serde(flatten)]
        result: &'a T,
    }
    WithStatus {
        status: "ok",
        result,
    }
    .serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.encode(&mut out);
        let frame = frame::decode(&out, usize::MAX).unwrap().unwrap();
        assert_eq!(frame.consumed, out.len());
        String::from_utf8(frame.body.to_vec()).unwrap()
    }

    fn id(text: &str) -> RequestId {
        RawValue::from_string(text.to_string()).unwrap()
    }

    fn reply_to(body: &str) -> String {
        match parse(body.as_bytes()) {
            Ok(request) => panic!("{body} parsed as {request:?}"),
            Err(bad) => json_of(&bad.into_reply()),
        }
    }

    #[test]
    fn v1_lock_parses_with_its_integer_id() {
        let request =
            parse(br#"{"command":"lock","parameters":{"lockName":"test"},"id":0}"#).unwrap();
        match request {
            Request::Lock {
                id,
                lock,
                timeout,
                mode,
                reclaim,
                semaphore: None,
            } => {
                assert_eq!(
                    (id.get(), lock.as_ref(), timeout, mode, reclaim),
                    ("0", "test", None, Mode::Exclusive, None)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_replies_are_byte_compatible() {
        let granted = Reply::Rpc {
            id: id("0"),
            result: Outcome::Granted {
                token: 17,
                proof: None,
            },
        };
        assert_eq!(
            json_of(&granted),
            r#"{"id":0,"result":{"status":"ok","token":17}}"#
        );
        let unlocked = Reply::Unlock {
            result: UnlockResult::Ok,
            lock_name: Some(id(r#""test""#)),
        };
        assert_eq!(
            json_of(&unlocked),
            r#"{"attempted":"unlock","result":"ok","lockName":"test"}"#
        );
        let invalid = Reply::Unlock {
            result: UnlockResult::Invalid,
            lock_name: None,
        };
        assert_eq!(
            json_of(&invalid),
            r#"{"attempted":"unlock","result":"invalid"}"#
        );
    }

    #[test]
    fn v1_unlock_echoes_the_name_as_sent() {
        match parse(br#"{"command":"unlock","lockName":5}"#).unwrap() {
            Request::Unlock {
                form: UnlockForm::V1 { lock_name },
                lock,
            } => assert_eq!((lock_name.get(), lock.as_ref()), ("5", "5")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reply_to(r#"{"command":"unlock"}"#),
            r#"{"attempted":"unlock","result":"invalid"}"#
        );
        assert_eq!(
            reply_to(r#"{"command":"unlock","lockName":["a"]}"#),
            r#"{"attempted":"unlock","result":"invalid"}"#
        );
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        for text in [r#""abc""#, "1.50", "-7", "true", "12345678901234567890123"] {
            let body = format!(r#"{{"command":"ping","id":{text}}}"#);
            match parse(body.as_bytes()).unwrap() {
                Request::Ping { id } => assert_eq!(id.get(), text),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            reply_to(r#"{"command":"ping","id":[1]}"#),
            r#"{"error":"invalidRequest","detail":"id must be a string, number or boolean, got `[1]`"}"#
        );
    }

    #[test]
    fn ids_longer_than_the_limit_are_invalid_requests() {
        // 256 bytes of JSON text, quotes included, is the most taken.
        let longest = format!("\"{}\"", "i".repeat(MAX_ID_BYTES - 2));
        let body = format!(r#"{{"command":"ping","id":{longest}}}"#);
        match parse(body.as_bytes()).unwrap() {
            Request::Ping { id } => assert_eq!(id.get(), longest),
            other => panic!("{other:?}"),
        }
        let number = "1".repeat(MAX_ID_BYTES + 1);
        let escaped = format!("\"{}\"", "\\n".repeat(128));
        for id in [number.as_str(), &escaped] {
            let body = format!(r#"{{"command":"lock","id":{id},"parameters":{{"lockName":"a"}}}}"#);
            assert_eq!(
                reply_to(&body),
                format!(
                    r#"{{"error":"invalidRequest","detail":"id is {} bytes of JSON, the limit is 256"}}"#,
                    id.len()
                )
            );
        }
    }

    #[test]
    fn not_json_and_not_objects_are_invalid_json() {
        for body in [
            "",
            "nope",
            "[1,2]",
            "\"str\"",
            "42",
            "{\"command\":",
            "{} x",
        ] {
            assert!(
                reply_to(body).starts_with(r#"{"error":"invalidJson","detail":"#),
                "{body}"
            );
        }
        let bad_utf8 = parse(b"{\"command\":\"lock\xff\"}").unwrap_err();
        assert!(matches!(bad_utf8, BadRequest::InvalidJson(ref d) if d.contains("UTF-8")));
    }

    #[test]
    fn command_missing_or_not_a_string_is_an_invalid_request() {
        assert_eq!(
            reply_to(r#"{"id":3}"#),
            r#"{"error":"invalidRequest","detail":"missing `command`","id":3}"#
        );
        for command in ["[\"lock\"]", "{\"a\":1}", "7", "null"] {
            let body = format!(r#"{{"command":{command},"id":1}}"#);
            let reply = reply_to(&body);
            assert!(reply.starts_with(r#"{"error":"invalidRequest""#), "{reply}");
        }
    }

    #[test]
    fn rpcs_without_an_id_are_invalid_requests() {
        let reply = reply_to(r#"{"command":"lock","parameters":{"lockName":"x"}}"#);
        assert_eq!(
            reply,
            r#"{"error":"invalidRequest","detail":"`lock` is an RPC and needs an `id`"}"#
        );
        let reply = reply_to(r#"{"command":"lock","id":1}"#);
        assert_eq!(
            reply,
            r#"{"error":"invalidRequest","detail":"`lock` needs `parameters`","id":1}"#
        );
    }

    #[test]
    fn unknown_command_with_an_id_is_invalid_by_id() {
        assert_eq!(
            reply_to(r#"{"command":"frobnicate","id":"q"}"#),
            r#"{"id":"q","result":{"status":"invalid","error":"unknown command `frobnicate`"}}"#
        );
    }

    #[test]
    fn lock_names_are_checked() {
        let lock = |name: &str| {
            format!(r#"{{"command":"lock","id":1,"parameters":{{"lockName":{name}}}}}"#)
        };
        let long = "x".repeat(1025);
        for name in ["\"\"", "[1]", "{}", "1.5", "true", &format!("\"{long}\"")] {
            let reply = reply_to(&lock(name));
            assert!(
                reply.starts_with(r#"{"id":1,"result":{"status":"invalid","error":"#),
                "{reply}"
            );
        }
        let max = format!("\"{}\"", "y".repeat(1024));
        assert!(parse(lock(&max).as_bytes()).is_ok());
        match parse(lock("-12").as_bytes()).unwrap() {
            Request::Lock { lock, .. } => assert_eq!(lock, "-12"),
            other => panic!("{other:?}"),
        }
        match parse(lock(r#""caf\u00e9""#).as_bytes()).unwrap() {
            Request::Lock { lock, .. } => assert_eq!(lock, "café"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lock_parameters_are_checked() {
        let lock = |extra: &str| {
            format!(r#"{{"command":"lock","id":1,"parameters":{{"lockName":"a",{extra}}}}}"#)
        };
        for extra in [
            r#""timeoutMs":-1"#,
            r#""timeoutMs":1.5"#,
            r#""timeoutMs":"5""#,
            r#""mode":"read""#,
            r#""mode":1"#,
        ] {
            let reply = reply_to(&lock(extra));
            assert!(reply.contains(r#""status":"invalid""#), "{extra}: {reply}");
        }
        match parse(lock(r#""timeoutMs":0,"mode":"shared""#).as_bytes()).unwrap() {
            Request::Lock { timeout, mode, .. } => {
                assert_eq!((timeout, mode), (Some(Duration::ZERO), Mode::Shared))
            }
            other => panic!("{other:?}"),
        }
        match parse(lock(r#""timeoutMs":null"#).as_bytes()).unwrap() {
            Request::Lock { timeout, .. } => assert_eq!(timeout, None),
            other => panic!("{other:?}"),
        }
        let reply = reply_to(r#"{"command":"lock","id":1,"parameters":"a"}"#);
        assert!(reply.contains("`parameters` must be an object"), "{reply}");
    }

    #[test]
    fn status_parameters_are_checked() {
        let status =
            |params: &str| format!(r#"{{"command":"status","id":1,"parameters":{params}}}"#);
        match parse(status(r#"{"prefix":"job/","limit":5}"#).as_bytes()).unwrap() {
            Request::Status { filter, limit, .. } => {
                assert_eq!((filter, limit), (StatusFilter::Prefix("job/".into()), 5))
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"limit":0}"#,
            r#"{"limit":100001}"#,
            r#"{"prefix":1}"#,
            r#"{"prefix":"a","lockName":"b"}"#,
        ] {
            assert!(
                reply_to(&status(bad)).contains(r#""status":"invalid""#),
                "{bad}"
            );
        }
    }

    #[test]
    fn duplicate_keys_are_refused_where_they_are_read() {
        let reply = reply_to(r#"{"command":"ping","command":"ping","id":1}"#);
        assert!(reply.starts_with(r#"{"error":"invalidJson""#), "{reply}");
        let reply =
            reply_to(r#"{"command":"lock","id":1,"parameters":{"lockName":"a","lockName":"b"}}"#);
        assert!(
            reply.contains(r#""status":"invalid""#) && reply.contains("duplicate"),
            "{reply}"
        );
        assert!(parse(br#"{"command":"ping","id":1,"x":1,"x":2}"#).is_ok());
    }

    #[test]
    fn hello_client_name_is_limited() {
        let hello = |client: &str| {
            format!(r#"{{"command":"hello","id":1,"parameters":{{"client":{client}}}}}"#)
        };
        assert!(parse(hello(&format!("\"{}\"", "c".repeat(256))).as_bytes()).is_ok());
        assert!(reply_to(&hello(&format!("\"{}\"", "c".repeat(257)))).contains("limit is 256"));
        assert!(reply_to(&hello("[]")).contains("`client` must be a string"));
    }

    #[test]
    fn errors_quote_at_most_128_bytes_of_input() {
        let body = format!(r#"{{"command":"{}","id":1}}"#, "é".repeat(200));
        let reply = reply_to(&body);
        assert!(reply.len() < 250 && reply.contains("..."), "{reply}");
    }

    #[test]
    fn common_replies_are_written_as_serde_writes_them() {
        let replies = [
            Reply::Rpc {
                id: id("7"),
                result: Outcome::Granted {
                    token: 1_795_690_400_469_314,
                    proof: None,
                },
            },
            Reply::Rpc {
                id: id("8"),
                result: Outcome::Granted {
                    token: 9,
                    proof: Some("0123456789abcdef0123456789abcdef".to_string()),
                },
            },
            Reply::Rpc {
                id: id(r#""x\"y""#),
                result: Outcome::Ok,
            },
            Reply::Rpc {
                id: id("1.50"),
                result: Outcome::Timeout,
            },
            Reply::Rpc {
                id: id("true"),
                result: Outcome::Cancelled,
            },
            Reply::Rpc {
                id: id("0"),
                result: Outcome::NotFound,
            },
            Reply::Unlock {
                result: UnlockResult::Ok,
                lock_name: Some(id(r#""jobs\/caf\u00e9""#)),
            },
            Reply::Unlock {
                result: UnlockResult::NotFound,
                lock_name: Some(id("42")),
            },
        ];
        for reply in &replies {
            let mut fast = Vec::new();
            assert!(reply.encode_common(&mut fast), "{reply:?}");
            let mut slow = Vec::new();
            frame::encode_with(&mut slow, |buf| serde_json::to_writer(buf, reply)).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow)
            );
        }
        let mut out = Vec::new();
        assert!(!Reply::message_too_large(10).encode_common(&mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn error_replies_have_their_documented_shape() {
        assert_eq!(
            json_of(&Reply::message_too_large(65536)),
            r#"{"error":"messageTooLarge","limit":65536}"#
        );
        let status = Reply::Rpc {
            id: id("1"),
            result: Outcome::Status(Box::new(StatusResult {
                locks: vec![],
                truncated: false,
            })),
        };
        assert_eq!(
            json_of(&status),
            r#"{"id":1,"result":{"status":"ok","locks":[],"truncated":false}}"#
        );
    }
}
