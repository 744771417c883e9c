//! The election thread: campaigns in etcd, renews the lease, reserves token
//! ranges, hands the held-lock list to the next leader, and tells the event
//! loop what changed (through a channel and the loop's waker). It never
//! touches a socket of the loop, nor the lock table.
//!
//! Keys, under the election name E: `E/<lease id>` is each server's
//! candidacy (its advertised address, attached to its lease; the one
//! created first leads, as etcd's own election recipe has it),
//! `E.tokens` the token ceiling, `E.held` the list a resigning leader
//! leaves, and `E.key` the secret that signs grant proofs.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::Waker;

use super::etcd::{Compare, Etcd, EtcdError, KeyValue, Op};
use super::term;
use crate::config::{self, ClusterConfig};
use crate::proof::ProofKey;
use crate::rate_limit::LogLimiter;
use crate::rate_limit::escaped;
use crate::tokens::{self, HeldLock, MAX_TOKEN, PreviousRun, RESERVATION};

/// The largest held-lock list left in etcd at a resignation, well under
/// etcd's largest request (1.5 MiB by default). A longer list is not left:
/// the next leader then waits out the whole grace, as after a crash.
const MAX_HELD_LIST_BYTES: usize = 1 << 20;

/// What the election tells the event loop.
#[derive(Debug)]
pub enum News {
    /// This server leads from now on.
    Leading(Box<Leadership>),
    /// The lease of `term` was renewed: the term is safe until `until`.
    Renewed {
        /// The term.
        term: u64,
        /// Until when.
        until: Instant,
    },
    /// `term` may issue tokens below `ceiling`.
    Reserved {
        /// The term.
        term: u64,
        /// The new ceiling.
        ceiling: u64,
    },
    /// The lease of `term` is gone: step down now.
    Lost {
        /// The term.
        term: u64,
        /// Why, for the log.
        why: String,
    },
    /// Another server leads, at this address; `None`: nobody is known to.
    Following(Option<String>),
    /// The resignation asked for is done, or failed.
    Resigned(Result<(), String>),
}

/// What a new leader starts from.
#[derive(Debug)]
pub struct Leadership {
    /// A number for this term, unique in this process.
    pub term: u64,
    /// The first token to issue.
    pub first_token: u64,
    /// Tokens below this are reserved in etcd for this term.
    pub ceiling: u64,
    /// What the previous leader left: its list when it resigned, unknown
    /// when it did not, none for the first leader ever.
    pub previous: PreviousRun,
    /// The key that signs and checks grant proofs, shared by all servers.
    pub key: ProofKey,
    /// The restart grace the previous leader would have waited itself
    /// after a crash: its clients may count on that long.
    pub previous_grace: Option<Duration>,
    /// The term is safe until this instant, unless renewed.
    pub until: Instant,
}

/// What the event loop asks of the election.
#[derive(Debug)]
pub enum Ask {
    /// Reserve more tokens for `term`.
    Reserve {
        /// The term.
        term: u64,
    },
    /// The loop stepped down from `term` (its term ran out).
    SteppedDown {
        /// The term.
        term: u64,
    },
    /// Leave `held` for the next leader if leading (`None`: not known),
    /// then resign and end the thread.
    Resign {
        /// The grants in force and still owed.
        held: Option<Vec<HeldLock>>,
    },
}

/// The event loop's end of the election.
pub struct Election {
    asks: Sender<Ask>,
    news: Receiver<News>,
    thread: Option<JoinHandle<()>>,
}

impl Election {
    /// Starts campaigning for `config`, as the etcd user of `credentials`
    /// if given; news wakes the loop through `waker`.
    pub fn start(
        config: &ClusterConfig,
        credentials: Option<(String, String)>,
        grace: Duration,
        waker: Arc<Waker>,
    ) -> Election {
        let (asks, asked) = mpsc::channel();
        let (tell, news) = mpsc::channel();
        let ttl = Duration::from_millis(config.lease_ttl_ms);
        let mut etcd = Etcd::new(config.etcd_endpoints.clone(), term::call_timeout(ttl));
        if let Some((user, password)) = credentials {
            etcd = etcd.with_credentials(user, password);
        }
        let campaign = Campaign {
            etcd,
            election: config.election.clone(),
            advertise: config.advertise.clone().unwrap_or_default(),
            ttl,
            grace,
            asked,
            tell,
            waker,
            terms: 0,
            following: None,
            trouble_log: LogLimiter::new(5, Duration::from_secs(10)),
            in_trouble: false,
            stale_lease: None,
            last_look: Instant::now(),
        };
        let thread = thread::Builder::new()
            .name("election".to_string())
            .spawn(move || campaign.run())
            .map_err(|e| error!("cannot start the election thread: {e}"))
            .ok();
        Election { asks, news, thread }
    }

    /// Asks the election for something; false if its thread has ended.
    pub fn ask(&self, ask: Ask) -> bool {
        self.asks.send(ask).is_ok()
    }

    /// The news so far, without waiting.
    pub fn news(&self) -> impl Iterator<Item = News> + '_ {
        self.news.try_iter()
    }

    /// Waits up to `timeout` for the resignation asked for to be done.
    pub fn wait_resigned(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.news.recv_timeout(left) {
                Ok(News::Resigned(result)) => {
                    if let Some(thread) = self.thread.take() {
                        let _ = thread.join();
                    }
                    return result;
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "etcd did not answer within {} ms",
                        timeout.as_millis()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the election thread has ended".to_string());
                }
            }
        }
    }
}

/// A candidacy in etcd: this server's key, attached to its lease.
struct Candidacy {
    lease: i64,
    key: Vec<u8>,
    create_revision: i64,
    /// The lease is safe (no other leader possible) until then.
    until: Instant,
    next_renewal: Instant,
    /// Leading, as this term.
    term: Option<u64>,
}

/// Why a candidacy ended.
enum Ended {
    /// Campaign again with a new lease.
    Again,
    /// Resigned: the thread ends.
    Resigned,
}

struct Campaign {
    etcd: Etcd,
    election: String,
    advertise: String,
    ttl: Duration,
    /// This server's restart grace, left in etcd for the next leader.
    grace: Duration,
    asked: Receiver<Ask>,
    tell: Sender<News>,
    waker: Arc<Waker>,
    terms: u64,
    following: Option<Option<String>>,
    trouble_log: LogLimiter,
    in_trouble: bool,
    /// A lease given up whose revocation has not gone through: its key
    /// would lead on, in this server's name, until it expired.
    stale_lease: Option<i64>,
    /// When etcd last told who leads.
    last_look: Instant,
}

impl Campaign {
    fn run(mut self) {
        loop {
            match self.candidacy() {
                Ok(Ended::Resigned) => return,
                Ok(Ended::Again) => {}
                Err(e) => {
                    self.trouble(&e);
                    // Whoever leads, this server cannot tell.
                    self.follow(None);
                    match self.asked.recv_timeout(term::look_every(self.ttl)) {
                        Ok(Ask::Resign { .. }) | Err(RecvTimeoutError::Disconnected) => {
                            self.send(News::Resigned(Ok(())));
                            return;
                        }
                        Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    }
                }
            }
        }
    }

    /// One lease: a candidacy, leading if it comes first, until the lease
    /// is lost or given up.
    fn candidacy(&mut self) -> Result<Ended, EtcdError> {
        if let Some(stale) = self.stale_lease {
            self.etcd.revoke(stale)?;
            self.stale_lease = None;
        }
        let sent = Instant::now();
        let lease = self.etcd.grant(term::ttl_secs(self.ttl))?;
        let key = format!("{}/{:x}", self.election, lease.id).into_bytes();
        let put = Op::Put {
            key: key.clone(),
            value: self.advertise.clone().into_bytes(),
            lease: lease.id,
        };
        let created = self.etcd.txn(&[Compare::Created(key.clone(), 0)], &[put]);
        let create_revision = match created {
            Ok((true, revision)) if revision > 0 => revision,
            Ok((true, revision)) => {
                let _ = self.etcd.revoke(lease.id);
                return Err(EtcdError(format!(
                    "etcd answered the candidacy with revision {revision}"
                )));
            }
            Ok((false, _)) => {
                let _ = self.etcd.revoke(lease.id);
                return Err(EtcdError(format!(
                    "the candidacy key {} exists already",
                    String::from_utf8_lossy(&key)
                )));
            }
            Err(e) => {
                let _ = self.etcd.revoke(lease.id);
                return Err(e);
            }
        };
        self.recovered();
        let mut me = Candidacy {
            lease: lease.id,
            key,
            create_revision,
            until: term::safe_until(sent, term::effective_ttl(self.ttl, lease.ttl_secs)),
            next_renewal: sent + term::renew_every(self.ttl),
            term: None,
        };
        let mut next_look = Instant::now();
        let mut reserve_asked = false;
        loop {
            let now = Instant::now();
            if me.term.is_some() && now >= me.until {
                // The loop steps down by itself at this instant; a later
                // renewal cannot make this term safe again.
                self.end_term(&mut me, "the leadership lease could not be renewed in time");
                self.give_up(me.lease);
                return Ok(Ended::Again);
            }
            if now >= me.next_renewal && !self.renew(&mut me) {
                return Ok(Ended::Again);
            }
            // A renewal that is due goes before anything else.
            if reserve_asked && Instant::now() < me.next_renewal {
                match self.reserve(&me) {
                    Ok(done) => reserve_asked = !done,
                    Err(e) => self.trouble(&e),
                }
            }
            if Instant::now() >= next_look && Instant::now() < me.next_renewal {
                next_look = Instant::now() + term::look_every(self.ttl);
                if !self.look(&mut me) {
                    return Ok(Ended::Again);
                }
            }
            let wake_at = me.next_renewal.min(next_look);
            let wait = wake_at.saturating_duration_since(Instant::now());
            match self.asked.recv_timeout(wait) {
                Ok(Ask::Reserve { term }) if me.term == Some(term) => reserve_asked = true,
                Ok(Ask::Reserve { .. }) => {}
                Ok(Ask::SteppedDown { term }) if me.term == Some(term) => {
                    me.term = None;
                    self.give_up(me.lease);
                    return Ok(Ended::Again);
                }
                Ok(Ask::SteppedDown { .. }) => {}
                Ok(Ask::Resign { held }) => {
                    let result = self.resign(&me, held);
                    self.send(News::Resigned(result));
                    return Ok(Ended::Resigned);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.etcd.revoke(me.lease);
                    return Ok(Ended::Resigned);
                }
            }
        }
    }

    /// Renews the lease; false when it is gone.
    fn renew(&mut self, me: &mut Candidacy) -> bool {
        let sent = Instant::now();
        match self.etcd.keep_alive(me.lease) {
            Ok(Some(lease)) => {
                self.recovered();
                me.until = term::safe_until(sent, term::effective_ttl(self.ttl, lease.ttl_secs));
                me.next_renewal = sent + term::renew_every(self.ttl);
                if let Some(term) = me.term {
                    self.send(News::Renewed {
                        term,
                        until: me.until,
                    });
                }
                true
            }
            Ok(None) => {
                self.end_term(me, "the leadership lease expired in etcd");
                false
            }
            Err(e) => {
                // Try again soon; the term runs out by itself if this lasts.
                self.trouble(&e);
                me.next_renewal = Instant::now() + term::look_every(self.ttl);
                true
            }
        }
    }

    /// Looks who leads; false when this candidacy's key is gone.
    fn look(&mut self, me: &mut Candidacy) -> bool {
        let mut prefix = self.election.clone().into_bytes();
        prefix.push(b'/');
        let first = match self.etcd.first_created(&prefix) {
            Ok(first) => first,
            Err(e) => {
                self.trouble(&e);
                // Whoever led may be gone by now: do not send clients there.
                if me.term.is_none() && self.last_look.elapsed() > self.ttl {
                    self.follow(None);
                }
                return true;
            }
        };
        self.last_look = Instant::now();
        match first {
            Some(kv) if kv.key == me.key => {
                if me.term.is_none()
                    && let Err(e) = self.lead(me)
                {
                    // Looked at again at the next look.
                    self.trouble(&e);
                }
                true
            }
            Some(kv) if kv.create_revision > me.create_revision => {
                // Created after this one, yet first: this one is gone.
                self.end_term(me, "the leadership key is gone from etcd");
                false
            }
            Some(kv) => {
                if me.term.is_some() {
                    self.end_term(me, "another server's key leads in etcd");
                    return false;
                }
                let address = String::from_utf8_lossy(&kv.value).into_owned();
                if is_candidacy(&kv.key, &prefix) && config::is_host_and_port(&address) {
                    self.follow(Some(address));
                } else {
                    // Not a pklock candidacy: another election's keys under
                    // this one's prefix (names that nest), or a stray key.
                    self.trouble(&EtcdError(format!(
                        "{} leads the election but is no server's candidacy; \
                         election names must not nest",
                        escaped(&String::from_utf8_lossy(&kv.key))
                    )));
                    self.follow(None);
                }
                true
            }
            None => {
                self.end_term(me, "the leadership key is gone from etcd");
                false
            }
        }
    }

    /// Becomes the leader: reserves the first tokens above every earlier
    /// leader's, and takes the list the previous leader left.
    fn lead(&mut self, me: &mut Candidacy) -> Result<(), EtcdError> {
        let secret = self.secret()?;
        for _ in 0..3 {
            let tokens_kv = self.etcd.get(&self.stem(".tokens"))?;
            let held_kv = self.etcd.get(&self.stem(".held"))?;
            let previous_grace = self
                .etcd
                .get(&self.stem(".grace"))?
                .map(|kv| parse_grace(&kv.value));
            let ceiling = match &tokens_kv {
                Some(kv) => parse_ceiling(&kv.value)?,
                None => 0,
            };
            let first_token = ceiling.max(tokens::clock_micros());
            let reserved = first_token.saturating_add(RESERVATION).min(MAX_TOKEN);
            let previous = match (&tokens_kv, &held_kv) {
                // No leader ever reserved a token: nothing can be held.
                (None, _) => PreviousRun::None,
                (Some(_), Some(held)) => match serde_json::from_slice(&held.value) {
                    Ok(list) => PreviousRun::Stopped(list),
                    Err(e) => {
                        warn!(
                            "the held-lock list the previous leader left in etcd is damaged \
                             ({e}): taking its end for a crash"
                        );
                        PreviousRun::Unknown
                    }
                },
                (Some(_), None) => PreviousRun::Unknown,
            };
            let compare = [
                Compare::Created(me.key.clone(), me.create_revision),
                Compare::Modified(self.stem(".tokens"), mod_revision(&tokens_kv)),
                Compare::Modified(self.stem(".held"), mod_revision(&held_kv)),
            ];
            let ops = [
                Op::Put {
                    key: self.stem(".tokens"),
                    value: reserved.to_string().into_bytes(),
                    lease: 0,
                },
                Op::Delete(self.stem(".held")),
                Op::Put {
                    key: self.stem(".grace"),
                    value: self.grace.as_millis().to_string().into_bytes(),
                    lease: 0,
                },
            ];
            // The calls above may have taken much of the lease (an etcd
            // that answers late): renewed now, the term starts with all of it.
            if !self.renew(me) {
                return Err(EtcdError(
                    "the lease ran out while taking the leadership".to_string(),
                ));
            }
            if !self.etcd.txn(&compare, &ops)?.0 {
                continue;
            }
            self.terms += 1;
            me.term = Some(self.terms);
            self.following = None;
            self.send(News::Leading(Box::new(Leadership {
                term: self.terms,
                first_token,
                ceiling: reserved,
                previous,
                key: ProofKey::from_secret(&secret),
                previous_grace,
                until: me.until,
            })));
            return Ok(());
        }
        Err(EtcdError(
            "the token ceiling kept changing while taking the leadership".to_string(),
        ))
    }

    /// Reserves more tokens for the term; true when done (or no longer asked).
    fn reserve(&mut self, me: &Candidacy) -> Result<bool, EtcdError> {
        let Some(term) = me.term else {
            return Ok(true);
        };
        let tokens_kv = self.etcd.get(&self.stem(".tokens"))?;
        let ceiling = match &tokens_kv {
            Some(kv) => parse_ceiling(&kv.value)?,
            None => 0,
        };
        let reserved = ceiling.saturating_add(RESERVATION).min(MAX_TOKEN);
        if reserved <= ceiling {
            // At the end of the token space: nothing more to reserve.
            return Ok(true);
        }
        let compare = [
            Compare::Created(me.key.clone(), me.create_revision),
            Compare::Modified(self.stem(".tokens"), mod_revision(&tokens_kv)),
        ];
        let put = Op::Put {
            key: self.stem(".tokens"),
            value: reserved.to_string().into_bytes(),
            lease: 0,
        };
        if self.etcd.txn(&compare, &[put])?.0 {
            self.send(News::Reserved {
                term,
                ceiling: reserved,
            });
            return Ok(true);
        }
        Ok(false)
    }

    /// Leaves the held list (when leading and it is known, and not too
    /// long), then revokes the lease, which deletes the candidacy key at
    /// once; the lease is revoked whatever became of the list.
    fn resign(&mut self, me: &Candidacy, held: Option<Vec<HeldLock>>) -> Result<(), String> {
        let left = match held {
            Some(held) if me.term.is_some() => self.leave_list(me, &held),
            _ => Ok(()),
        };
        let revoked = self.etcd.revoke(me.lease).map_err(|e| e.to_string());
        left.and(revoked)
    }

    fn leave_list(&mut self, me: &Candidacy, held: &[HeldLock]) -> Result<(), String> {
        let list = serde_json::to_vec(held).map_err(|e| e.to_string())?;
        if list.len() > MAX_HELD_LIST_BYTES {
            return Err(format!(
                "the list of {} grant(s) in force takes {} bytes, over {MAX_HELD_LIST_BYTES}; \
                 none is left, and the next leader waits out the whole grace",
                held.len(),
                list.len()
            ));
        }
        let put = Op::Put {
            key: self.stem(".held"),
            value: list,
            lease: 0,
        };
        let compare = [Compare::Created(me.key.clone(), me.create_revision)];
        match self.etcd.txn(&compare, &[put]) {
            Ok((true, _)) => {
                info!(
                    "left the list of {} grant(s) in force in etcd for the next leader",
                    held.len()
                );
                Ok(())
            }
            Ok((false, _)) => Err("the leadership was already lost; no list left".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The grant-proof secret, made by the first leader ever.
    fn secret(&mut self) -> Result<Vec<u8>, EtcdError> {
        let key = self.stem(".key");
        if let Some(kv) = self.etcd.get(&key)? {
            return Ok(kv.value);
        }
        let secret = ProofKey::new_secret()
            .map_err(|e| EtcdError(format!("cannot make a grant-proof key: {e}")))?;
        let put = Op::Put {
            key: key.clone(),
            value: secret,
            lease: 0,
        };
        self.etcd.txn(&[Compare::Created(key.clone(), 0)], &[put])?;
        self.etcd
            .get(&key)?
            .map(|kv| kv.value)
            .ok_or_else(|| EtcdError("the grant-proof key vanished from etcd".to_string()))
    }

    /// Revokes a lease this server no longer stands on, now or before the
    /// next candidacy.
    fn give_up(&mut self, lease: i64) {
        if self.etcd.revoke(lease).is_err() {
            self.stale_lease = Some(lease);
        }
    }

    fn end_term(&mut self, me: &mut Candidacy, why: &str) {
        if let Some(term) = me.term.take() {
            self.send(News::Lost {
                term,
                why: why.to_string(),
            });
        }
    }

    fn follow(&mut self, leader: Option<String>) {
        if self.following.as_ref() != Some(&leader) {
            self.following = Some(leader.clone());
            self.send(News::Following(leader));
        }
    }

    fn stem(&self, suffix: &str) -> Vec<u8> {
        format!("{}{suffix}", self.election).into_bytes()
    }

    fn send(&self, news: News) {
        if self.tell.send(news).is_ok()
            && let Err(e) = self.waker.wake()
        {
            error!("cannot wake the event loop with news of the election: {e}");
        }
    }

    fn trouble(&mut self, e: &EtcdError) {
        self.in_trouble = true;
        if let Some(suppressed) = self.trouble_log.admit(Instant::now()) {
            if suppressed > 0 {
                warn!("{suppressed} more etcd error lines were not logged");
            }
            warn!("etcd: {e}");
        }
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.in_trouble) && self.trouble_log.admit(Instant::now()).is_some()
        {
            info!("etcd answers again");
        }
    }
}

/// Whether `key` is `<prefix><lease id in hex>`, as candidacies are named.
fn is_candidacy(key: &[u8], prefix: &[u8]) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|id| !id.is_empty() && id.iter().all(u8::is_ascii_hexdigit))
}

fn mod_revision(kv: &Option<KeyValue>) -> i64 {
    kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The grace a previous leader left. No server leaves more than a
/// configuration may set, so a value that is not a number up to that was
/// damaged in etcd: the longest grace is waited out instead, which covers
/// whatever the previous leader promised its clients.
fn parse_grace(value: &[u8]) -> Duration {
    let most = crate::config::MAX_RESTART_GRACE_MS;
    let ms = std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|&ms| ms <= most)
        .unwrap_or_else(|| {
            warn!(
                "the previous leader's grace in etcd is not a number of ms up to {most}: {}; \
                 waiting out {most} ms",
                escaped(&String::from_utf8_lossy(value.get(..64).unwrap_or(value)))
            );
            most
        });
    Duration::from_millis(ms)
}

fn parse_ceiling(value: &[u8]) -> Result<u64, EtcdError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ceiling| ceiling <= MAX_TOKEN)
        .ok_or_else(|| {
            EtcdError(format!(
                "the token ceiling in etcd is not a number up to 2^53: {}",
                escaped(&String::from_utf8_lossy(value.get(..64).unwrap_or(value)))
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_previous_leaders_grace_is_taken_up_to_the_longest_a_config_may_set() {
        assert_eq!(parse_grace(b"4200"), Duration::from_millis(4200));
        assert_eq!(parse_grace(b" 0\n"), Duration::ZERO);
        let most = Duration::from_millis(crate::config::MAX_RESTART_GRACE_MS);
        assert_eq!(parse_grace(b"3600000"), most);
        // Damaged: waited out in full, never for ever, never skipped.
        assert_eq!(parse_grace(b"99999999999999999"), most);
        assert_eq!(parse_grace(b"-5"), most);
        assert_eq!(parse_grace(b"soon"), most);
    }
}
