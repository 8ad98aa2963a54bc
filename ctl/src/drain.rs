//! `node drain --wait`: polls `Nodes.DrainStatus` until the node has nothing
//! left, showing progress on stderr.
//!
//! On a terminal the progress is one line redrawn in place (carriage
//! return); otherwise (a log, a CI job) a line is written only when the
//! counts change, at most once per second. The decisions live in
//! [`Tracker`] and the drawing in [`Screen`], both free of I/O and clocks,
//! so that tests can drive them; [`follow`] only polls and writes.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use charon_proto::v1::DrainStatusRequest;
use charon_proto::v1::DrainStatusResponse;
use tokio::time::MissedTickBehavior;

use crate::cli::DrainWait;
use crate::client;
use crate::error::{CtlError, EXIT_NOT_DRAINED};
use crate::output::{self, now_ms, to_json};

/// How often `Nodes.DrainStatus` is asked.
pub const POLL: Duration = Duration::from_millis(250);

/// How long the drained node may be missing from gossip before `--wait`
/// gives up on it.
pub const NOT_LIVE_LIMIT: Duration = Duration::from_secs(10);

/// Off a terminal, the least time between two progress lines.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// Whether there is nothing left to wait for: the node says `drained`, or
/// it has no connections and no tunnels left and its listeners are closed.
pub fn is_drained(s: &DrainStatusResponse) -> bool {
    s.status == "drained" || (s.http_connections == 0 && s.tunnels == 0 && s.listeners_closed)
}

/// What to do after a poll.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Poll again; show this progress line first, if any.
    Wait(Option<String>),
    /// Nothing is left: done.
    Drained,
    /// The node has not been live for more than [`NOT_LIVE_LIMIT`].
    NotLive,
    /// The drain was requested at an earlier poll and is gone now.
    Undrained,
}

/// Follows the answers of `Nodes.DrainStatus`, one poll at a time.
#[derive(Debug)]
pub struct Tracker {
    terminal: bool,
    /// Connections plus tunnels at the first poll: the bar's 0 %.
    first_total: Option<u64>,
    /// The drain record was seen, so its absence later means an undrain.
    requested: bool,
    /// Since when the node has not been live.
    not_live_since: Option<Instant>,
    /// Off a terminal: when the last line was written, and its counts.
    logged: Option<(Instant, Counts)>,
}

/// What a line off a terminal is written for when it changes.
type Counts = (u64, u64, bool, String);

impl Tracker {
    pub fn new(terminal: bool) -> Self {
        Tracker {
            terminal,
            first_total: None,
            requested: false,
            not_live_since: None,
            logged: None,
        }
    }

    /// Takes one answer; `now` is the monotonic clock (for the rules about
    /// time), `now_ms` the wall clock in Unix milliseconds (for the time
    /// to the deadline).
    pub fn observe(&mut self, s: &DrainStatusResponse, now: Instant, now_ms: u64) -> Step {
        let total = s.http_connections.saturating_add(s.tunnels);
        // The bar's 0 % is the first answer from the draining node: before
        // the drain reaches it, it still says "serving" with no counts.
        let first_total = if s.status == "serving" && self.first_total.is_none() {
            total
        } else {
            *self.first_total.get_or_insert(total)
        };
        if is_drained(s) {
            return Step::Drained;
        }
        if s.requested {
            self.requested = true;
        } else if self.requested {
            return Step::Undrained;
        }
        if s.live {
            self.not_live_since = None;
        } else {
            let since = *self.not_live_since.get_or_insert(now);
            if now.duration_since(since) > NOT_LIVE_LIMIT {
                return Step::NotLive;
            }
        }
        let line = output::drain_progress(s, first_total, now_ms);
        if self.terminal {
            return Step::Wait(Some(line));
        }
        let counts = (s.http_connections, s.tunnels, s.live, s.status.clone());
        let due = match &self.logged {
            None => true,
            Some((at, logged)) => *logged != counts && now.duration_since(*at) >= LOG_EVERY,
        };
        if !due {
            return Step::Wait(None);
        }
        self.logged = Some((now, counts));
        Step::Wait(Some(line))
    }
}

/// Draws progress lines on stderr: redrawn in place on a terminal, one
/// after the other elsewhere. Each method returns the text to write.
#[derive(Debug)]
pub struct Screen {
    terminal: bool,
    /// The characters of the line on the terminal now; 0 when none.
    drawn: usize,
}

impl Screen {
    pub fn new(terminal: bool) -> Self {
        Screen { terminal, drawn: 0 }
    }

    /// Shows `line`. On a terminal it replaces the line drawn before,
    /// padded with spaces where that one was longer.
    pub fn draw(&mut self, line: &str) -> String {
        if !self.terminal {
            return format!("{line}\n");
        }
        let len = line.chars().count();
        let pad = self.drawn.saturating_sub(len);
        self.drawn = len;
        format!("\r{line}{}", " ".repeat(pad))
    }

    /// Ends the line on the terminal, keeping it, so that what follows
    /// starts on a line of its own.
    pub fn finish(&mut self) -> String {
        if std::mem::take(&mut self.drawn) == 0 {
            String::new()
        } else {
            "\n".to_string()
        }
    }

    /// Blanks the line on the terminal, so that a summary takes its place.
    pub fn clear(&mut self) -> String {
        match std::mem::take(&mut self.drawn) {
            0 => String::new(),
            n => format!("\r{}\r", " ".repeat(n)),
        }
    }
}

/// Polls `Nodes.DrainStatus` for `node` every [`POLL`] until it is drained
/// (exit 0, with a summary on stderr), `wait.timeout` passes (exit
/// [`EXIT_NOT_DRAINED`], with what is left), or it fails (`Err`). With
/// `json`, stdout gets the last answer as JSON.
pub async fn follow(
    nodes: &mut client::Nodes,
    node: &str,
    wait: DrainWait,
    json: bool,
    endpoint: &str,
) -> Result<ExitCode, CtlError> {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let give_up = wait.timeout.map(|timeout| started + timeout);
    let mut tracker = Tracker::new(terminal);
    let mut screen = Screen::new(terminal);
    let mut last: Option<DrainStatusResponse> = None;
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let poll = async {
            ticks.tick().await;
            nodes
                .drain_status(DrainStatusRequest {
                    node: node.to_string(),
                })
                .await
        };
        let answer = match give_up {
            None => poll.await,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, poll).await {
                    Ok(answer) => answer,
                    Err(_) => break,
                }
            }
        };
        let status = match answer {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                write_stderr(&screen.finish())?;
                let error = CtlError::from_call(status, "Nodes.DrainStatus", endpoint);
                return Err(CtlError::DrainWait(Box::new(error)));
            }
        };
        let label = if status.name.is_empty() {
            node.to_string()
        } else {
            status.name.clone()
        };
        match tracker.observe(&status, Instant::now(), now_ms()) {
            Step::Wait(Some(line)) => write_stderr(&screen.draw(&line))?,
            Step::Wait(None) => {}
            Step::Drained => {
                write_stderr(&screen.clear())?;
                write_stderr(&output::drain_summary(&status, node, started.elapsed()))?;
                if json {
                    write_stdout(&to_json(&status))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            Step::NotLive => {
                write_stderr(&screen.finish())?;
                return Err(CtlError::NotLive {
                    node: label,
                    limit: NOT_LIVE_LIMIT,
                });
            }
            Step::Undrained => {
                write_stderr(&screen.finish())?;
                return Err(CtlError::Undrained(label));
            }
        }
        last = Some(status);
    }
    // --wait-timeout passed.
    write_stderr(&screen.finish())?;
    let timeout = wait.timeout.unwrap_or_default();
    write_stderr(&output::drain_timeout_report(last.as_ref(), node, timeout))?;
    if let (true, Some(status)) = (json, &last) {
        write_stdout(&to_json(status))?;
    }
    Ok(ExitCode::from(EXIT_NOT_DRAINED))
}

fn write_stderr(text: &str) -> Result<(), CtlError> {
    if text.is_empty() {
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    err.write_all(text.as_bytes())?;
    err.flush()?;
    Ok(())
}

fn write_stdout(text: &str) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-05-01T12:00:00Z.
    const NOW_MS: u64 = 1_714_564_800_000;

    fn status(http_connections: u64, tunnels: u64) -> DrainStatusResponse {
        DrainStatusResponse {
            node_id: "7b2d4e6f-2222-4000-8000-000000000002".into(),
            name: "n2".into(),
            status: "draining".into(),
            live: true,
            http_connections,
            tunnels,
            deadline_ms: NOW_MS + 130_000,
            listeners_closed: false,
            cut: 0,
            requested: true,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn drained_by_status_or_by_nothing_left_behind_closed_listeners() {
        assert!(!is_drained(&status(1, 0)));
        assert!(!is_drained(&status(0, 0)));
        assert!(is_drained(&DrainStatusResponse {
            listeners_closed: true,
            ..status(0, 0)
        }));
        assert!(!is_drained(&DrainStatusResponse {
            listeners_closed: true,
            ..status(0, 1)
        }));
        assert!(is_drained(&DrainStatusResponse {
            status: "drained".into(),
            ..status(3, 0)
        }));
    }

    #[test]
    fn on_a_terminal_every_poll_is_drawn_and_the_bar_counts_from_the_first() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(true);
        let lines: Vec<Step> = [(12, 340), (12, 340), (6, 170), (0, 1)]
            .into_iter()
            .enumerate()
            .map(|(i, (c, t))| tracker.observe(&status(c, t), t0 + POLL * i as u32, NOW_MS))
            .collect();
        let want = |line: &str| Step::Wait(Some(line.to_string()));
        assert_eq!(
            lines,
            [
                want(
                    "[----------] n2 draining: 12 HTTP connections, 340 tunnels, 2m10s to deadline"
                ),
                want(
                    "[----------] n2 draining: 12 HTTP connections, 340 tunnels, 2m10s to deadline"
                ),
                want(
                    "[#####-----] n2 draining: 6 HTTP connections, 170 tunnels, 2m10s to deadline"
                ),
                want("[#########-] n2 draining: 0 HTTP connections, 1 tunnel, 2m10s to deadline"),
            ]
        );
        let done = DrainStatusResponse {
            status: "drained".into(),
            ..status(0, 0)
        };
        assert_eq!(tracker.observe(&done, t0 + POLL * 4, NOW_MS), Step::Drained);
    }

    #[test]
    fn off_a_terminal_a_line_is_written_when_the_counts_change_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(false);
        let mut at = |after: u64, c, t| {
            matches!(
                tracker.observe(&status(c, t), t0 + ms(after), NOW_MS),
                Step::Wait(Some(_))
            )
        };
        assert!(at(0, 10, 10), "the first answer is written");
        assert!(!at(250, 9, 10), "changed, but within a second");
        assert!(!at(500, 10, 10), "unchanged");
        assert!(!at(1250, 10, 10), "a second later, but unchanged");
        assert!(at(1500, 8, 10), "changed, a second later");
        assert!(!at(2750, 8, 10), "unchanged");
        assert!(at(3000, 8, 9), "changed, more than a second later");
        assert!(!at(3250, 7, 9), "changed, but within a second");
        assert!(at(4000, 7, 9), "still different from the last line written");
    }

    #[test]
    fn a_node_not_live_for_more_than_ten_seconds_ends_the_wait() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(false);
        let down = DrainStatusResponse {
            live: false,
            ..status(5, 5)
        };
        assert!(matches!(
            tracker.observe(&down, t0, NOW_MS),
            Step::Wait(Some(line)) if line.contains(" n2 not live: ")
        ));
        assert!(matches!(
            tracker.observe(&down, t0 + NOT_LIVE_LIMIT, NOW_MS),
            Step::Wait(_)
        ));
        // Back in time: the count starts over.
        assert!(matches!(
            tracker.observe(&status(5, 5), t0 + ms(10_500), NOW_MS),
            Step::Wait(_)
        ));
        assert!(matches!(
            tracker.observe(&down, t0 + ms(11_000), NOW_MS),
            Step::Wait(_)
        ));
        assert!(matches!(
            tracker.observe(&down, t0 + ms(21_000), NOW_MS),
            Step::Wait(_)
        ));
        assert_eq!(
            tracker.observe(&down, t0 + ms(21_001), NOW_MS),
            Step::NotLive
        );
    }

    #[test]
    fn a_drain_that_disappears_was_undrained() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(false);
        let unrequested = DrainStatusResponse {
            requested: false,
            status: "serving".into(),
            ..status(5, 5)
        };
        // Not seen yet: gossip may not have carried it.
        assert!(matches!(
            tracker.observe(&unrequested, t0, NOW_MS),
            Step::Wait(_)
        ));
        assert!(matches!(
            tracker.observe(&status(5, 5), t0 + POLL, NOW_MS),
            Step::Wait(_)
        ));
        assert_eq!(
            tracker.observe(&unrequested, t0 + POLL * 2, NOW_MS),
            Step::Undrained
        );
    }

    #[test]
    fn a_drained_first_answer_is_done_at_once() {
        let mut tracker = Tracker::new(true);
        let done = DrainStatusResponse {
            status: "drained".into(),
            cut: 2,
            ..status(0, 0)
        };
        assert_eq!(
            tracker.observe(&done, Instant::now(), NOW_MS),
            Step::Drained
        );
    }

    #[test]
    fn a_terminal_line_is_redrawn_in_place() {
        let mut screen = Screen::new(true);
        assert_eq!(screen.finish(), "", "nothing drawn yet");
        assert_eq!(screen.draw("[---] n2: 10"), "\r[---] n2: 10");
        assert_eq!(screen.draw("[#--] n2: 9"), "\r[#--] n2: 9 ");
        assert_eq!(screen.draw("[##-] n2: 100"), "\r[##-] n2: 100");
        assert_eq!(screen.clear(), format!("\r{}\r", " ".repeat(13)));
        assert_eq!(screen.clear(), "");
        assert_eq!(screen.draw("x"), "\rx");
        assert_eq!(screen.finish(), "\n");
        assert_eq!(screen.finish(), "");
    }

    #[test]
    fn off_a_terminal_lines_follow_each_other() {
        let mut screen = Screen::new(false);
        assert_eq!(screen.draw("[---] n2: 10"), "[---] n2: 10\n");
        assert_eq!(screen.draw("[#--] n2: 9"), "[#--] n2: 9\n");
        assert_eq!(screen.finish(), "");
        assert_eq!(screen.clear(), "");
    }
}
