//! The access log: one JSON line per proxied request and per closed tunnel.
//!
//! Lines go to stdout (default), a file rotated by size, or nowhere; the
//! proxy never waits for the disk: lines are handed to a writer thread over
//! a bounded channel and dropped (and counted) if it falls behind. The last
//! [`RING`] events are kept in memory for `charonctl logs --since`, and
//! every event is broadcast to `charonctl logs -f` followers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::broadcast;

use super::metrics::Metrics;

/// Events kept in memory.
pub const RING: usize = 10_000;
/// Lines the writer may fall behind by before new ones are dropped.
const QUEUE: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    /// A file, rotated to `.1` … `.5` when it reaches `max_bytes`.
    File {
        path: PathBuf,
        max_bytes: u64,
    },
}

impl Sink {
    pub fn parse(v: &str, max_mb: u64) -> Sink {
        match v {
            "off" | "none" | "" => Sink::Off,
            "stdout" | "-" => Sink::Stdout,
            path => Sink::File {
                path: PathBuf::from(path),
                max_bytes: max_mb.max(1) * 1024 * 1024,
            },
        }
    }
}

/// One event, as written (JSON) and as filtered.
fn arc_empty(s: &Arc<str>) -> bool {
    s.is_empty()
}

fn static_empty(s: &&'static str) -> bool {
    s.is_empty()
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Entry {
    /// RFC 3339 (UTC, milliseconds). May be left empty: it is then filled
    /// from `ts_ms` when the entry is serialised.
    pub ts: String,
    pub ts_ms: u64,
    /// The fields below that are shared with the proxy's own records
    /// (node, client, host, upstream) are `Arc<str>`: an entry is made per
    /// request and 10,000 are kept, so a copy of each would cost an
    /// allocation to make and another to free.
    pub node: Arc<str>,
    pub kind: &'static str,
    pub client: Arc<str>,
    /// The proxy host's name ("" when none matched).
    pub host: Arc<str>,
    #[serde(skip_serializing_if = "arc_empty")]
    pub host_id: Arc<str>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub authority: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(skip_serializing_if = "static_empty")]
    pub proto: &'static str,
    pub tls: bool,
    pub status: u16,
    #[serde(skip_serializing_if = "arc_empty")]
    pub upstream: Arc<str>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub closed_by: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
}

impl Entry {
    /// Back to the default, keeping the strings' capacity (see
    /// [`AccessLog::record_with`]). Every field is named, so a new one cannot
    /// be forgotten here.
    fn clear(&mut self, empty: &Arc<str>) {
        let Entry {
            ts,
            ts_ms,
            node,
            kind,
            client,
            host,
            host_id,
            method,
            authority,
            path,
            proto,
            tls,
            status,
            upstream,
            duration_ms,
            bytes_to_upstream,
            bytes_to_client,
            frames_to_upstream,
            frames_to_client,
            close_code,
            closed_by,
            error,
            trace_id,
        } = self;
        for s in [ts, method, authority, path, closed_by, error, trace_id] {
            s.clear();
        }
        for a in [node, client, host, host_id, upstream] {
            *a = empty.clone();
        }
        *ts_ms = 0;
        *kind = "";
        *proto = "";
        *tls = false;
        *status = 0;
        *duration_ms = 0.0;
        for n in [
            bytes_to_upstream,
            bytes_to_client,
            frames_to_upstream,
            frames_to_client,
        ] {
            *n = None;
        }
        *close_code = None;
    }
}

/// An event as kept and streamed: the entry, and its JSON line, made once
/// and only when first asked for (at once when there is a writer).
#[derive(Debug)]
pub struct Event {
    entry: Entry,
    json: OnceLock<String>,
}

impl Event {
    fn new(entry: Entry) -> Event {
        Event {
            entry,
            json: OnceLock::new(),
        }
    }

    /// The entry, for filtering and for the API's fields.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The JSON line (no trailing newline), made on first call.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| to_json(&self.entry))
    }
}

/// `e` as one JSON line, with an empty `ts` filled from `ts_ms`.
fn to_json(e: &Entry) -> String {
    if e.ts.is_empty() {
        let mut filled = e.clone();
        filled.ts = crate::util::rfc3339_ms(e.ts_ms);
        serde_json::to_string(&filled)
    } else {
        serde_json::to_string(e)
    }
    .unwrap_or_default()
}

pub struct AccessLog {
    node: Arc<str>,
    /// Shared by the entries' empty fields, so clearing one allocates nothing.
    empty: Arc<str>,
    ring: Mutex<VecDeque<Arc<Event>>>,
    live: broadcast::Sender<Arc<Event>>,
    writer: Option<SyncSender<String>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    pub fn new(node: &str, sink: Sink, metrics: Arc<Metrics>) -> std::io::Result<Arc<AccessLog>> {
        let writer = match sink {
            Sink::Off => None,
            sink => {
                let (tx, rx) = sync_channel::<String>(QUEUE);
                let mut out = Output::open(sink)?;
                std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || {
                        while let Ok(line) = rx.recv() {
                            out.write_line(&line);
                            // Flush when the queue is drained, not per line.
                            while let Ok(line) = rx.try_recv() {
                                out.write_line(&line);
                            }
                            out.flush();
                        }
                    })?;
                Some(tx)
            }
        };
        Ok(Arc::new(AccessLog {
            node: Arc::from(node),
            empty: Arc::from(""),
            ring: Mutex::new(VecDeque::with_capacity(1024)),
            live: broadcast::channel(4096).0,
            writer,
            metrics,
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Keeps `e` (with this node's name), writes it if there is a sink and
    /// sends it to followers if there are any. Without a sink the JSON is
    /// only made when an API reader asks for it ([`Event::json`]).
    pub fn record(&self, e: Entry) {
        self.record_with(|slot| *slot = e);
    }

    /// As [`AccessLog::record`], with the entry filled in place by `fill`.
    ///
    /// Once the ring is full, the event that falls out of it is reused when
    /// nobody else holds it (no reader of `recent`, no follower's queue): its
    /// strings keep their capacity, so a caller that fills them with
    /// `push_str` records a request without allocating or freeing anything.
    /// That was four allocations and frees per proxied request.
    pub fn record_with(&self, fill: impl FnOnce(&mut Entry)) {
        let oldest = {
            let mut ring = self.ring.lock().expect("access log lock");
            if ring.len() >= RING {
                ring.pop_front()
            } else {
                None
            }
        };
        let mut ev = match oldest {
            // Held only here (weak references are never made): ours to reuse.
            Some(ev) if Arc::strong_count(&ev) == 1 && Arc::weak_count(&ev) == 0 => ev,
            _ => Arc::new(Event::new(Entry::default())),
        };
        // Unshared: either just made, or checked above.
        let slot = Arc::get_mut(&mut ev).expect("an unshared event");
        slot.json = OnceLock::new();
        slot.entry.clear(&self.empty);
        fill(&mut slot.entry);
        let e = &mut slot.entry;
        e.node = self.node.clone();
        if let Some(w) = &self.writer {
            if e.ts.is_empty() {
                e.ts = crate::util::rfc3339_ms(e.ts_ms);
            }
            let json = serde_json::to_string(&*e).unwrap_or_default();
            match w.try_send(json.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.metrics
                        .access_log_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            slot.json = OnceLock::from(json);
        }
        let overflow = {
            let mut ring = self.ring.lock().expect("access log lock");
            // Another thread may have pushed between the two locks.
            let overflow = (ring.len() >= RING).then(|| ring.pop_front()).flatten();
            ring.push_back(ev.clone());
            overflow
        };
        drop(overflow);
        // Checked after the ring push: a follower that subscribes after the
        // check reads the ring after the push (it subscribes first), so it
        // can still find the event there.
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(ev);
        }
    }

    /// Kept events newer than `since_ms`, oldest first.
    pub fn recent(&self, since_ms: u64) -> Vec<Arc<Event>> {
        self.ring
            .lock()
            .expect("access log lock")
            .iter()
            .filter(|e| e.entry.ts_ms >= since_ms)
            .cloned()
            .collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }
}

/// Whether an event passes a `charonctl logs` filter.
pub fn matches(e: &Event, host: &str, status: &str) -> bool {
    let e = e.entry();
    let host_ok = host.is_empty() || &*e.host == host || &*e.host_id == host;
    let status_ok = match status {
        "" => true,
        s if s.len() == 3 && s.ends_with("xx") => {
            s.as_bytes()[0].checked_sub(b'0').map(u16::from) == Some(e.status / 100)
        }
        s => s.parse::<u16>().ok() == Some(e.status),
    };
    host_ok && status_ok
}

enum Output {
    Stdout(std::io::Stdout),
    File {
        path: PathBuf,
        max_bytes: u64,
        file: BufWriter<File>,
        written: u64,
    },
}

impl Output {
    fn open(sink: Sink) -> std::io::Result<Output> {
        Ok(match sink {
            Sink::Off | Sink::Stdout => Output::Stdout(std::io::stdout()),
            Sink::File { path, max_bytes } => {
                let file = OpenOptions::new().create(true).append(true).open(&path)?;
                let written = file.metadata()?.len();
                Output::File {
                    path,
                    max_bytes,
                    file: BufWriter::new(file),
                    written,
                }
            }
        })
    }

    fn write_line(&mut self, line: &str) {
        match self {
            Output::Stdout(s) => {
                let mut s = s.lock();
                let _ = s.write_all(line.as_bytes());
                let _ = s.write_all(b"\n");
            }
            Output::File {
                path,
                max_bytes,
                file,
                written,
            } => {
                if *written + line.len() as u64 + 1 > *max_bytes && *written > 0 {
                    let _ = file.flush();
                    for i in (1..5).rev() {
                        let _ = std::fs::rename(rotated(path, i), rotated(path, i + 1));
                    }
                    let _ = std::fs::rename(&*path, rotated(path, 1));
                    match OpenOptions::new().create(true).append(true).open(&*path) {
                        Ok(f) => {
                            *file = BufWriter::new(f);
                            *written = 0;
                        }
                        Err(e) => eprintln!("access log: cannot reopen {}: {e}", path.display()),
                    }
                }
                let _ = file.write_all(line.as_bytes());
                let _ = file.write_all(b"\n");
                *written += line.len() as u64 + 1;
            }
        }
    }

    fn flush(&mut self) {
        match self {
            Output::Stdout(s) => {
                let _ = s.lock().flush();
            }
            Output::File { file, .. } => {
                let _ = file.flush();
            }
        }
    }
}

fn rotated(path: &std::path::Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<Event>();
    };

    fn sample(ts: &str) -> Entry {
        Entry {
            ts: ts.into(),
            ts_ms: 1_795_513_100_550,
            kind: "http",
            client: "192.0.2.1:5000".into(),
            host: "a.test".into(),
            host_id: "h-1".into(),
            method: "GET".into(),
            path: "/x?\"y\"".into(),
            tls: true,
            status: 502,
            duration_ms: 1.5,
            bytes_to_client: Some(42),
            error: "upstream refused".into(),
            ..Default::default()
        }
    }

    #[test]
    fn without_a_sink_the_json_is_made_on_demand_with_ts_filled() {
        let log = AccessLog::new("n1", Sink::Off, Arc::default()).unwrap();
        log.record(sample(""));
        let got = log.recent(0);
        assert_eq!(got.len(), 1);
        assert!(got[0].json.get().is_none(), "JSON made eagerly");
        assert_eq!(
            got[0].json(),
            concat!(
                r#"{"ts":"2026-11-24T09:38:20.550Z","ts_ms":1795513100550,"node":"n1","#,
                r#""kind":"http","client":"192.0.2.1:5000","host":"a.test","host_id":"h-1","#,
                r#""method":"GET","path":"/x?\"y\"","tls":true,"status":502,"#,
                r#""duration_ms":1.5,"bytes_to_client":42,"error":"upstream refused"}"#,
            )
        );
        // The same bytes as a caller-filled entry, serialised directly.
        let mut filled = sample("2026-11-24T09:38:20.550Z");
        filled.node = "n1".into();
        assert_eq!(got[0].json(), serde_json::to_string(&filled).unwrap());
        // The entry itself is kept as recorded.
        assert_eq!(got[0].entry().ts, "");
        assert!(matches(&got[0], "h-1", "5xx"));
        assert!(log.recent(1_795_513_100_551).is_empty());
    }

    #[test]
    fn a_recycled_event_carries_nothing_of_its_last_request() {
        let log = AccessLog::new("n1", Sink::Off, Arc::default()).unwrap();
        for _ in 0..RING {
            log.record(sample(""));
        }
        // Held by a reader: must not be reused or changed under it.
        let held = log.recent(0).swap_remove(0);
        let held_ptr = Arc::as_ptr(&held);
        let unheld_ptr = Arc::as_ptr(&log.recent(0)[1]);
        // Later than the samples; the next two push the held event and the
        // one after it out.
        const LATER: u64 = 2_000_000_000_000;
        for i in 0..2 {
            log.record_with(|e| {
                e.ts_ms = LATER + i;
                e.kind = "http";
                e.method.push_str("HEAD");
                e.status = 200;
            });
        }
        assert_eq!(held.entry().status, 502, "a held event was changed");
        assert_eq!(held.entry().error, "upstream refused");
        let got = log.recent(LATER);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| Arc::as_ptr(e) != held_ptr));
        assert_eq!(Arc::as_ptr(&got[1]), unheld_ptr, "not reused");
        // The second one reused the unheld event's allocation; neither
        // shows any field of the sample but what was filled in.
        for (i, ev) in got.iter().enumerate() {
            let want = Entry {
                ts_ms: LATER + i as u64,
                kind: "http",
                node: "n1".into(),
                method: "HEAD".into(),
                status: 200,
                ..Default::default()
            };
            assert_eq!(ev.json(), to_json(&want), "event {i}");
        }
        assert_eq!(log.recent(0).len(), RING);
    }

    #[test]
    fn a_follower_subscribed_before_a_record_receives_it() {
        let log = AccessLog::new("n1", Sink::Off, Arc::default()).unwrap();
        log.record(sample("")); // nobody listening: not sent
        let mut follower = log.follow();
        log.record(sample(""));
        let ev = follower.try_recv().unwrap();
        assert_eq!(&*ev.entry().host, "a.test");
        assert!(ev
            .json()
            .starts_with("{\"ts\":\"2026-11-24T09:38:20.550Z\","));
        assert!(follower.try_recv().is_err());
        assert_eq!(log.recent(0).len(), 2);
    }

    #[test]
    fn filters_by_host_and_status_class() {
        let e = Event::new(Entry {
            ts_ms: 1,
            kind: "http",
            host: "a.test".into(),
            host_id: "h-1".into(),
            status: 503,
            ..Default::default()
        });
        assert!(matches(&e, "", ""));
        assert!(matches(&e, "a.test", "5xx"));
        assert!(matches(&e, "h-1", "503"));
        assert!(!matches(&e, "b.test", ""));
        assert!(!matches(&e, "", "4xx"));
        assert!(!matches(&e, "", "404"));
    }

    #[test]
    fn a_file_sink_rotates_and_the_ring_keeps_recent_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::new(
            "n1",
            Sink::File {
                path: path.clone(),
                max_bytes: 2000,
            },
            Arc::default(),
        )
        .unwrap();
        let mut follower = log.follow();
        for i in 0..50 {
            log.record(Entry {
                ts_ms: i,
                kind: "http",
                host: "a.test".into(),
                status: 200,
                ..Default::default()
            });
        }
        assert_eq!(log.recent(40).len(), 10);
        let first = follower.try_recv().unwrap();
        assert!(first.json().contains("\"node\":\"n1\""), "{}", first.json());
        drop(log);
        // The writer thread ends when the log is dropped; wait for the files.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let rotated = rotated(&path, 1);
            let lines = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map(|s| s.lines().count())
                    .unwrap_or(0)
            };
            let total = lines(&path)
                + lines(&rotated)
                + lines(&super::rotated(&path, 2))
                + lines(&super::rotated(&path, 3))
                + lines(&super::rotated(&path, 4))
                + lines(&super::rotated(&path, 5));
            if rotated.exists() && total > 0 && std::fs::metadata(&path).unwrap().len() <= 2000 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no rotation happened");
            std::thread::yield_now();
        }
    }
}
