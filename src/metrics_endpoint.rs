//! The `metrics_listen` sockets and their scrape connections, in the one
//! event loop: accept (from `allowed` peers, a few at a time), read one
//! request, write one response, close. Bounded like any peer: the request's
//! size, the number of scrapes open (over all and per address), and a
//! deadline for each.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::warn;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::allow_list::AllowList;
use crate::metrics::{self, MAX_REQUEST_BYTES, Request};

/// Scrape connections open at once at most; more are closed at accept.
const MAX_SCRAPES: usize = 16;
/// Scrape connections open at once from one address at most, so that one
/// peer holding connections open cannot keep every other scraper out.
const MAX_SCRAPES_PER_IP: usize = 4;
/// A scrape must be answered and read within this long of its accept.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Metrics listeners at most (their tokens come before the scrapes').
const MAX_LISTENERS: usize = 64;

/// One scrape connection.
struct Scrape {
    stream: TcpStream,
    peer: std::net::IpAddr,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    /// Its request is whole: what comes after is not read.
    answered: bool,
    /// Its request waits for the metrics text, which a walk is gathering.
    waiting: bool,
}

/// The metrics listeners and their connections.
pub struct MetricsEndpoint {
    listeners: Vec<(TcpListener, SocketAddr)>,
    scrapes: Slab<Scrape>,
    first_token: usize,
}

impl MetricsEndpoint {
    /// Binds `addrs`, registering them from token `first_token` on; the
    /// scrapes take the tokens after `MAX_LISTENERS` more.
    pub fn bind(
        addrs: &[SocketAddr],
        registry: &Registry,
        first_token: usize,
    ) -> Result<MetricsEndpoint, (SocketAddr, io::Error)> {
        let mut listeners = Vec::new();
        for (i, &addr) in addrs.iter().take(MAX_LISTENERS).enumerate() {
            let fail = |e| (addr, e);
            let mut listener = TcpListener::bind(addr).map_err(fail)?;
            let bound = listener.local_addr().map_err(fail)?;
            registry
                .register(&mut listener, Token(first_token + i), Interest::READABLE)
                .map_err(fail)?;
            listeners.push((listener, bound));
        }
        Ok(MetricsEndpoint {
            listeners,
            scrapes: Slab::new(),
            first_token,
        })
    }

    /// The addresses bound.
    pub fn local_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.listeners.iter().map(|(_, addr)| *addr)
    }

    /// Whether `token` is one of the endpoint's.
    pub fn owns(&self, token: Token) -> bool {
        // A slab of at most MAX_SCRAPES entries keys them below it.
        token
            .0
            .checked_sub(self.first_token)
            .is_some_and(|offset| offset < MAX_LISTENERS + MAX_SCRAPES)
    }

    fn scrape_key(&self, token: Token) -> Option<usize> {
        token
            .0
            .checked_sub(self.first_token + MAX_LISTENERS)
            .filter(|key| self.scrapes.contains(*key))
    }

    /// Handles a readiness event of one of the endpoint's tokens. Returns
    /// the scrapes whose whole request waits for its answer, for
    /// [`MetricsEndpoint::answer`].
    pub fn on_event(
        &mut self,
        token: Token,
        registry: &Registry,
        allowed: &AllowList,
        now: Instant,
    ) -> Vec<(usize, Request)> {
        if let Some(index) = token
            .0
            .checked_sub(self.first_token)
            .filter(|i| *i < self.listeners.len())
        {
            self.accept(index, registry, allowed, now);
            return Vec::new();
        }
        let Some(key) = self.scrape_key(token) else {
            return Vec::new();
        };
        match self.progress(key, registry) {
            Ok(Some(request)) => vec![(key, request)],
            Ok(None) => Vec::new(),
            Err(_) => {
                self.close(key, registry);
                Vec::new()
            }
        }
    }

    fn accept(&mut self, index: usize, registry: &Registry, allowed: &AllowList, now: Instant) {
        loop {
            let Some((listener, _)) = self.listeners.get(index) else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("metrics: accept failed: {e}");
                    return;
                }
            };
            let from_peer = self
                .scrapes
                .iter()
                .filter(|(_, scrape)| scrape.peer == peer.ip())
                .count();
            if !allowed.permits(peer.ip())
                || self.scrapes.len() >= MAX_SCRAPES
                || from_peer >= MAX_SCRAPES_PER_IP
            {
                // Dropped: closed at once.
                continue;
            }
            let entry = self.scrapes.vacant_entry();
            let token = Token(self.first_token + MAX_LISTENERS + entry.key());
            if registry
                .register(&mut stream, token, Interest::READABLE)
                .is_ok()
            {
                entry.insert(Scrape {
                    stream,
                    peer: peer.ip(),
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    deadline: now + SCRAPE_DEADLINE,
                    answered: false,
                    waiting: false,
                });
            }
        }
    }

    /// Reads what came, or writes what is left; `Some` once the request
    /// is whole. An error closes the scrape.
    fn progress(&mut self, key: usize, registry: &Registry) -> io::Result<Option<Request>> {
        let Some(scrape) = self.scrapes.get_mut(key) else {
            return Ok(None);
        };
        if scrape.waiting {
            return Ok(None);
        }
        if scrape.answered {
            return self.write(key, registry).map(|()| None);
        }
        let mut buf = [0u8; 2048];
        loop {
            match scrape.stream.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    let room = MAX_REQUEST_BYTES.saturating_sub(scrape.input.len());
                    scrape.input.extend_from_slice(&buf[..n.min(room)]);
                    match metrics::parse(&scrape.input) {
                        Request::Incomplete => {}
                        whole => {
                            scrape.answered = true;
                            return Ok(Some(whole));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps a whole request for the metrics text until
    /// [`MetricsEndpoint::answer_waiting`].
    pub fn wait(&mut self, key: usize) {
        if let Some(scrape) = self.scrapes.get_mut(key) {
            scrape.waiting = true;
        }
    }

    /// Answers every scrape kept by [`MetricsEndpoint::wait`] with `body`.
    /// Each then has a whole deadline to read it: the wait was the
    /// server's, not the peer's.
    pub fn answer_waiting(&mut self, body: &str, registry: &Registry, now: Instant) {
        let waiting: Vec<usize> = self
            .scrapes
            .iter()
            .filter(|(_, scrape)| scrape.waiting)
            .map(|(key, _)| key)
            .collect();
        for key in waiting {
            if let Some(scrape) = self.scrapes.get_mut(key) {
                scrape.waiting = false;
                scrape.deadline = now + SCRAPE_DEADLINE;
            }
            self.answer(key, &Request::Metrics, body, registry);
        }
    }

    /// Sends the response to a whole request, with `body` for `/metrics`.
    pub fn answer(&mut self, key: usize, request: &Request, body: &str, registry: &Registry) {
        let Some(scrape) = self.scrapes.get_mut(key) else {
            return;
        };
        scrape.output = metrics::response(request, body);
        scrape.input = Vec::new();
        if self.write(key, registry).is_err() {
            self.close(key, registry);
        }
    }

    /// Writes what the socket takes; closes the scrape once all is sent.
    fn write(&mut self, key: usize, registry: &Registry) -> io::Result<()> {
        let Some(scrape) = self.scrapes.get_mut(key) else {
            return Ok(());
        };
        while scrape.written < scrape.output.len() {
            let pending = scrape.output.get(scrape.written..).unwrap_or_default();
            match scrape.stream.write(pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => scrape.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let token = Token(self.first_token + MAX_LISTENERS + key);
                    return registry.reregister(&mut scrape.stream, token, Interest::WRITABLE);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.close(key, registry);
        Ok(())
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        if let Some(mut scrape) = self.scrapes.try_remove(key) {
            let _ = registry.deregister(&mut scrape.stream);
        }
    }

    /// Closes the scrapes past their deadline, but those waiting for the
    /// metrics text: a walk always ends, and then answers them.
    pub fn close_overdue(&mut self, now: Instant, registry: &Registry) {
        let overdue: Vec<usize> = self
            .scrapes
            .iter()
            .filter(|(_, scrape)| !scrape.waiting && scrape.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in overdue {
            self.close(key, registry);
        }
    }

    /// The next scrape deadline, for the poll's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.scrapes
            .iter()
            .filter(|(_, scrape)| !scrape.waiting)
            .map(|(_, scrape)| scrape.deadline)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;
    use std::io::{Read, Write};

    #[test]
    fn a_scrape_waiting_for_the_text_is_answered_however_long_the_walk_took() {
        let poll = Poll::new().unwrap();
        let registry = poll.registry();
        let localhost = ["127.0.0.1:0".parse().unwrap()];
        let mut endpoint = MetricsEndpoint::bind(&localhost, registry, 100).unwrap();
        let addr = endpoint.local_addrs().next().unwrap();
        let allowed = AllowList::parse(&["127.0.0.1"]).unwrap();
        let mut scraper = std::net::TcpStream::connect(addr).unwrap();
        scraper
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        scraper
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let accepted = Instant::now();
        endpoint.on_event(Token(100), registry, &allowed, accepted);
        let scrape_token = Token(100 + MAX_LISTENERS);
        let mut whole = Vec::new();
        for _ in 0..500 {
            whole = endpoint.on_event(scrape_token, registry, &allowed, accepted);
            if !whole.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let [(key, Request::Metrics)] = whole.as_slice() else {
            panic!("not one whole scrape: {whole:?}");
        };
        endpoint.wait(*key);

        // The walk takes twice the scrape's deadline.
        let later = accepted + 2 * SCRAPE_DEADLINE;
        endpoint.close_overdue(later, registry);
        endpoint.answer_waiting("pklock_up 1\n", registry, later);
        let mut response = String::new();
        scraper.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("\r\n\r\npklock_up 1\n"), "{response}");
    }
}
