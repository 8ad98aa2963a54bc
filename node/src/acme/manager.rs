//! The loop every node runs when ACME is on: each tick it lists the
//! certificates the cluster should hold ([`super::names`]), and for each
//! one that is due and that this node is responsible for
//! ([`super::duty`]), takes the lease and runs the order
//! ([`super::client`]) in a task of its own, refreshing the lease while it
//! works. Failures are recorded with their reason and retried after a
//! backoff; a draining node gives its orders up so another node continues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use instant_acme::{Account, CertificateIdentifier};
use tokio::task::JoinHandle;

use super::client::{self, note, update_order, Ctx, Failure};
use super::duty;
use super::metrics;
use super::names::{self, Wanted};
use crate::cluster::gossip::{STATUS_DRAINED, STATUS_DRAINING};
use crate::store::acme::AcmeOrder;
use crate::store::StoreError;
use crate::tls::cert::StoredCert;
use crate::util::wall_ms;

/// Whether the CA offers renewal information (RFC 9773), learnt from the
/// first answer: [`ARI_UNKNOWN`], [`ARI_YES`] or [`ARI_NO`].
const ARI_UNKNOWN: u8 = 0;
const ARI_YES: u8 = 1;
const ARI_NO: u8 = 2;

pub struct Manager {
    ctx: Arc<Ctx>,
    /// The account, once loaded: (account URL, client).
    account: tokio::sync::Mutex<Option<(String, Account)>>,
    /// One task per certificate id: its order, or a renewal-information
    /// check.
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    ari: AtomicU8,
}

impl Manager {
    pub fn new(ctx: Ctx) -> Arc<Manager> {
        Arc::new(Manager {
            ctx: Arc::new(ctx),
            account: tokio::sync::Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            ari: AtomicU8::new(ARI_UNKNOWN),
        })
    }

    /// Runs until `stop` resolves; then running orders are abandoned (the
    /// lease runs out and another node resumes them).
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.ctx.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        tracing::info!(directory = %self.ctx.settings.directory, "automatic certificates (ACME) on");
        loop {
            tokio::select! {
                _ = tick.tick() => self.tick().await,
                _ = &mut stop => break,
            }
        }
        for (_, t) in self.tasks.lock().expect("tasks lock").drain() {
            t.abort();
        }
    }

    /// Live members that serve (not draining or drained), by node id, and
    /// whether this node is one of them.
    async fn candidates(&self) -> (Vec<String>, bool) {
        let members = self.ctx.cluster.members().await;
        let serving = |s: &str| s != STATUS_DRAINING && s != STATUS_DRAINED;
        let ids: Vec<String> = members
            .iter()
            .filter(|m| m.live && serving(&m.status))
            .map(|m| m.node_id.clone())
            .collect();
        let me = members.iter().any(|m| m.is_self && serving(&m.status));
        (ids, me)
    }

    async fn tick(self: &Arc<Self>) {
        self.tasks
            .lock()
            .expect("tasks lock")
            .retain(|_, t| !t.is_finished());
        let (candidates, serving) = self.candidates().await;
        if !serving {
            self.give_up_orders();
            return;
        }
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let me = self.ctx.store.node_id().to_string();
        let snap = self.ctx.store.snapshot();
        let wanted = names::wanted(snap.hosts.iter().map(|h| &**h));
        if wanted.is_empty() {
            return;
        }
        if !self.ensure_account(&refs, &me).await {
            return;
        }
        let now = wall_ms();
        for w in wanted {
            if self.tasks.lock().expect("tasks lock").contains_key(&w.id) {
                continue;
            }
            let order = snap.acme_orders.get(&w.id).map(|o| &**o);
            let cert = snap.certs.iter().find(|c| c.id == w.id).map(|c| &**c);
            if duty::responsible(&w.id, &refs) != Some(me.as_str()) {
                continue;
            }
            if duty::due_at(order, cert, self.ctx.settings.renew_after) > now {
                if let Some(c) = cert.filter(|c| c.source == "acme") {
                    self.maybe_check_ari(&w.id, order, c, now);
                }
                continue;
            }
            if !duty::may_take(order, &me, now) {
                continue;
            }
            let renewing = cert.is_some_and(|c| c.source == "acme");
            let m = self.clone();
            let id = w.id.clone();
            let task = tokio::spawn(async move { m.attempt(w, renewing).await });
            self.tasks.lock().expect("tasks lock").insert(id, task);
        }
    }

    /// Asks the CA when to renew (ARI) when the last answer said to ask
    /// again by now; never when the CA has no ARI or `renew_after` is set.
    fn maybe_check_ari(
        self: &Arc<Self>,
        id: &str,
        order: Option<&AcmeOrder>,
        cert: &StoredCert,
        now: u64,
    ) {
        if self.ari.load(Ordering::Relaxed) == ARI_NO
            || self.ctx.settings.renew_after.is_some()
            || order.is_some_and(|o| o.ari_check_at_ms > now)
        {
            return;
        }
        let (m, id2, pem) = (self.clone(), id.to_string(), cert.cert_pem.clone());
        let task = tokio::spawn(async move { m.check_ari(id2, pem).await });
        self.tasks
            .lock()
            .expect("tasks lock")
            .insert(id.to_string(), task);
    }

    /// Records the CA's renewal window for the certificate (so every node
    /// knows when it is due), and when to ask again.
    async fn check_ari(self: Arc<Self>, id: String, cert_pem: String) {
        let account = match self.account.lock().await.as_ref() {
            Some((_, a)) => a.clone(),
            None => return,
        };
        let node = &self.ctx.node_name;
        let update = match client::renewal_info(&account, &id, &cert_pem).await {
            Ok(None) => {
                if self.ari.swap(ARI_NO, Ordering::Relaxed) != ARI_NO {
                    tracing::info!(directory = %self.ctx.settings.directory,
                        "the CA offers no renewal information (ARI): renewing at two thirds of the lifetime");
                }
                return;
            }
            Ok(Some((at, again))) => {
                self.ari.store(ARI_YES, Ordering::Relaxed);
                update_order(&self.ctx.store, &id, |o| {
                    if o.ari_renew_at_ms != at {
                        let when = crate::util::rfc3339_secs(at);
                        note(
                            o,
                            node,
                            &format!("CA renewal window (ARI): renew at {when}"),
                        );
                    }
                    o.ari_renew_at_ms = at;
                    o.ari_check_at_ms = again;
                })
            }
            Err(f) => {
                tracing::warn!(cert = %id, node = %node, error = %f.reason,
                    "cannot fetch renewal information (ARI); asking again in an hour");
                update_order(&self.ctx.store, &id, |o| {
                    o.ari_check_at_ms = wall_ms() + 3_600_000;
                })
            }
        };
        if let Err(e) = update {
            tracing::warn!(cert = %id, error = %e, "cannot record the renewal window");
        }
    }

    /// The identifier of the certificate a renewal replaces, when the CA
    /// offers ARI (it then exempts the order from rate limits).
    fn replaces(&self, id: &str, renewing: bool) -> Option<CertificateIdentifier<'static>> {
        if !renewing || self.ari.load(Ordering::Relaxed) != ARI_YES {
            return None;
        }
        let snap = self.ctx.store.snapshot();
        let cert = snap.certs.iter().find(|c| c.id == id)?;
        client::ari_id(&cert.cert_pem).ok()
    }

    /// Loads the cluster's account, or registers it when this node is the
    /// one responsible for it. `false`: not available yet.
    async fn ensure_account(&self, candidates: &[&str], me: &str) -> bool {
        let dir = &self.ctx.settings.directory;
        let snap = self.ctx.store.snapshot();
        let rec = snap.acme_accounts.iter().find(|a| &a.directory == dir);
        let mut cached = self.account.lock().await;
        match (rec, cached.as_ref()) {
            (Some(r), Some((url, _))) if *url == r.account_url => true,
            (Some(r), _) => match client::load_account(&self.ctx, r).await {
                Ok(a) => {
                    *cached = Some((r.account_url.clone(), a));
                    true
                }
                Err(f) => {
                    tracing::warn!(directory = %dir, error = %f.reason, "cannot load the ACME account");
                    false
                }
            },
            (None, _) if duty::responsible(&format!("account\n{dir}"), candidates) == Some(me) => {
                match client::create_account(&self.ctx).await {
                    Ok((a, r)) => {
                        *cached = Some((r.account_url, a));
                        true
                    }
                    Err(f) => {
                        tracing::warn!(directory = %dir, error = %f.reason, "cannot register an ACME account");
                        false
                    }
                }
            }
            // Another node registers it; its record arrives by replication.
            (None, _) => false,
        }
    }

    /// A draining node stops its orders and ends its leases at once, so
    /// the next node in rendezvous order continues without waiting.
    fn give_up_orders(&self) {
        let ids: Vec<String> = {
            let mut tasks = self.tasks.lock().expect("tasks lock");
            tasks
                .drain()
                .map(|(id, t)| {
                    t.abort();
                    id
                })
                .collect()
        };
        let me = self.ctx.store.node_id().to_string();
        for id in ids {
            let r = update_order(&self.ctx.store, &id, |o| {
                if o.holder == me {
                    o.lease_until_ms = 0;
                    note(o, &self.ctx.node_name, "draining: handed the order over");
                }
            });
            if let Err(e) = r {
                tracing::warn!(cert = %id, error = %e, "cannot release the ACME lease");
            }
        }
    }

    /// Takes the lease, and keeps it only if every live member agrees it
    /// is ours once the write has reached them.
    async fn take_lease(&self, w: &Wanted, renewing: bool) -> Result<bool, StoreError> {
        let me = self.ctx.store.node_id().to_string();
        let lease = self.ctx.settings.lease;
        let (o, stamp) = update_order(&self.ctx.store, &w.id, |o| {
            let now = wall_ms();
            if !duty::may_take(Some(o), &me, now) {
                return;
            }
            let takeover = !o.holder.is_empty()
                && o.holder != me
                && o.status != "valid"
                && o.status != "failed";
            o.names = w.names.clone();
            o.holder = me.clone();
            o.holder_name = self.ctx.node_name.clone();
            o.lease_until_ms = now + lease.as_millis() as u64;
            o.status = if renewing { "renewing" } else { "pending" }.into();
            let what = if takeover {
                "took the order over"
            } else {
                "took the order"
            };
            note(o, &self.ctx.node_name, what);
        })?;
        if o.holder != me {
            return Ok(false);
        }
        if let Some(s) = stamp {
            self.ctx
                .cluster
                .wait_for_write(&s.origin, s.seq, lease / 3)
                .await;
        }
        let snap = self.ctx.store.snapshot();
        let held = snap.acme_orders.get(&w.id).is_some_and(|o| o.holder == me);
        Ok(held)
    }

    async fn attempt(self: Arc<Self>, w: Wanted, renewing: bool) {
        match self.take_lease(&w, renewing).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(cert = %w.id, error = %e, "cannot take the ACME lease");
                return;
            }
        }
        let account = match self.account.lock().await.as_ref() {
            Some((_, a)) => a.clone(),
            None => return,
        };
        metrics::ORDERS.inc();
        let started = Instant::now();
        tracing::info!(cert = %w.id, host = %w.host_id, names = ?w.names, node = %self.ctx.node_name, renewing, "ordering a certificate");
        let replaces = self.replaces(&w.id, renewing);
        let result = tokio::select! {
            r = self.run_order_again_on_bad_nonce(&account, &w, replaces.as_ref()) => r,
            _ = self.keep_lease(&w.id) => unreachable!("keep_lease never returns"),
        };
        match result {
            Ok(cert) => {
                metrics::ISSUED.inc();
                tracing::info!(cert = %w.id, host = %w.host_id, names = ?w.names, node = %self.ctx.node_name,
                    took_ms = started.elapsed().as_millis() as u64, serial = %cert.serial,
                    "certificate issued");
            }
            Err(f) => self.record_failure(&w, f),
        }
    }

    /// Runs the order, and runs it again (resuming the recorded order)
    /// when the CA refused a nonce: such a refusal means the CA did
    /// nothing, so it is no reason to back off, let alone to hand the
    /// order to the next attempt.
    async fn run_order_again_on_bad_nonce(
        &self,
        account: &Account,
        w: &Wanted,
        replaces: Option<&CertificateIdentifier<'static>>,
    ) -> Result<StoredCert, Failure> {
        let mut tries = 0;
        loop {
            tries += 1;
            match client::run_order(&self.ctx, account, w, replaces).await {
                Err(f) if f.kind == "nonce" && tries < 3 => {
                    tracing::info!(cert = %w.id, error = %f.reason, "the CA refused a nonce; going on with the order");
                }
                r => return r,
            }
        }
    }

    /// Refreshes the lease every third of its length while the order runs.
    async fn keep_lease(&self, id: &str) {
        let me = self.ctx.store.node_id().to_string();
        let lease = self.ctx.settings.lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            let r = update_order(&self.ctx.store, id, |o| {
                if o.holder == me {
                    o.lease_until_ms = wall_ms() + lease.as_millis() as u64;
                }
            });
            if let Err(e) = r {
                tracing::warn!(cert = %id, error = %e, "cannot refresh the ACME lease");
            }
        }
    }

    fn record_failure(&self, w: &Wanted, f: Failure) {
        metrics::failed(f.kind);
        let mut next = 0;
        let r = update_order(&self.ctx.store, &w.id, |o: &mut AcmeOrder| {
            o.failures += 1;
            let validation = f.kind == "validation";
            let wait = duty::backoff(
                self.ctx.settings.retry_min,
                o.failures,
                f.retry_after,
                validation,
            );
            next = wall_ms() + wait.as_millis() as u64;
            o.status = "failed".into();
            o.reason = f.reason.clone();
            o.next_attempt_ms = next;
            o.lease_until_ms = 0;
            if matches!(f.kind, "challenge" | "validation") {
                // The CA's order is spent: the next attempt places a new one.
                // After other errors the next attempt asks the CA for the
                // order's state and resumes it unless it is invalid: a
                // refused request does not make a second order.
                o.order_url.clear();
            }
            note(
                o,
                &self.ctx.node_name,
                &format!("failed ({}): {}", f.kind, f.reason),
            );
        });
        if let Err(e) = r {
            tracing::warn!(cert = %w.id, error = %e, "cannot record the ACME failure");
        }
        tracing::warn!(cert = %w.id, host = %w.host_id, names = ?w.names, node = %self.ctx.node_name,
            error = %f.reason, kind = f.kind, retry_in_ms = next.saturating_sub(wall_ms()),
            "certificate order failed");
    }
}
