//! Batched polling for every job of the process: one task asks Hetzner about all in-flight
//! actions (`GET /actions?id=…`, 25 ids a request), another lists the tailnet's tagged devices
//! once for every job waiting to enroll. Jobs never poll on their own.
//!
//! When to poll: Hetzner reports each running action's `progress`, so the action watcher predicts
//! when the earliest action will finish and polls just after that, which keeps both the request
//! count and the detection delay small. With no progress to go on, and for devices, the tick
//! starts short and backs off while nothing changes. A failed poll is not an error for anyone:
//! the client already retried it, and the waiters simply wait for the next tick.

use crate::clients::hetzner::{Action, ActionStatus, HetznerClient};
use crate::clients::tailscale::{Device, DeviceFilter, TailscaleClient};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Finished actions are delivered as they are; a poll error never reaches a waiter (it keeps
/// waiting, bounded by its job's deadline).
type ActionSender = oneshot::Sender<Action>;

#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// First poll after an action is registered, and the shortest gap between polls.
    pub min_interval: Duration,
    /// Longest gap between action polls when there is no progress to predict from.
    pub max_interval: Duration,
    /// Longest gap between device listings while jobs wait to enroll.
    pub device_max_interval: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            min_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(10),
            device_max_interval: Duration::from_millis(800),
        }
    }
}

struct ActionWaiter {
    registered: Instant,
    next_poll: Instant,
    /// Consecutive polls that showed no progress, for backoff.
    idle_polls: u32,
    senders: Vec<ActionSender>,
}

struct ActionState {
    waiting: HashMap<i64, ActionWaiter>,
}

/// Waits for Hetzner actions to finish, for all jobs at once.
#[derive(Clone)]
pub struct ActionWatcher {
    state: Arc<Mutex<ActionState>>,
    wake: Arc<Notify>,
    settings: WatchSettings,
}

impl ActionWatcher {
    pub fn start(hetzner: HetznerClient, settings: WatchSettings) -> Self {
        let state = Arc::new(Mutex::new(ActionState {
            waiting: HashMap::new(),
        }));
        let wake = Arc::new(Notify::new());
        tokio::spawn(action_loop(
            Arc::downgrade(&state),
            wake.clone(),
            hetzner,
            settings.clone(),
        ));
        ActionWatcher {
            state,
            wake,
            settings,
        }
    }

    /// Resolves when the action has finished (`success` or `error`). Dropping the future
    /// unregisters interest.
    pub async fn wait(&self, id: i64) -> Action {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            let now = Instant::now();
            let w = state.waiting.entry(id).or_insert_with(|| ActionWaiter {
                registered: now,
                next_poll: now + self.settings.min_interval,
                idle_polls: 0,
                senders: Vec::new(),
            });
            w.senders.push(tx);
        }
        self.wake.notify_one();
        match rx.await {
            Ok(action) => action,
            // The watcher is gone only when the process is shutting down.
            Err(_) => std::future::pending().await,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn action_loop(
    state: Weak<Mutex<ActionState>>,
    wake: Arc<Notify>,
    hetzner: HetznerClient,
    settings: WatchSettings,
) {
    loop {
        // Sleep until the earliest scheduled poll, or until someone registers.
        let next = {
            let Some(state) = state.upgrade() else { return };
            let mut s = lock(&state);
            s.waiting.retain(|_, w| {
                w.senders.retain(|tx| !tx.is_closed());
                !w.senders.is_empty()
            });
            s.waiting.values().map(|w| w.next_poll).min()
        };
        match next {
            None => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = wake.notified() => continue,
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            Some(_) => {}
        }
        let ids: Vec<i64> = {
            let Some(state) = state.upgrade() else { return };
            let s = lock(&state);
            s.waiting.keys().copied().collect()
        };
        if ids.is_empty() {
            continue;
        }
        let result = hetzner.get_actions(&ids).await;
        let Some(state) = state.upgrade() else { return };
        let mut s = lock(&state);
        let now = Instant::now();
        match result {
            Ok(actions) => {
                let by_id: HashMap<i64, Action> = actions.into_iter().map(|a| (a.id, a)).collect();
                for id in ids {
                    let Some(w) = s.waiting.get_mut(&id) else {
                        continue;
                    };
                    match by_id.get(&id) {
                        Some(a) if a.status != ActionStatus::Running => {
                            if let Some(w) = s.waiting.remove(&id) {
                                for tx in w.senders {
                                    let _ = tx.send(a.clone());
                                }
                            }
                        }
                        Some(a) if a.progress > 0 && a.progress < 100 => {
                            // Linear prediction from the progress so far, polled just after.
                            let elapsed = now - w.registered;
                            let total = elapsed.mul_f64(100.0 / a.progress as f64);
                            let due = w.registered + total + Duration::from_millis(50);
                            w.next_poll =
                                due.clamp(now + settings.min_interval, now + settings.max_interval);
                            w.idle_polls = 0;
                        }
                        _ => {
                            w.idle_polls += 1;
                            w.next_poll = now
                                + backoff(
                                    settings.min_interval,
                                    settings.max_interval,
                                    w.idle_polls,
                                );
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, actions = ids.len(), "polling actions failed; will retry");
                for w in s.waiting.values_mut() {
                    w.idle_polls += 1;
                    w.next_poll =
                        now + backoff(settings.min_interval, settings.max_interval, w.idle_polls);
                }
            }
        }
    }
}

/// The poll gap after `idle` polls without news: the shared exponential schedule.
fn backoff(min: Duration, max: Duration, idle: u32) -> Duration {
    crate::clients::retry::exp_delay(min, max, idle)
}

struct DeviceWaiter {
    tags: Vec<String>,
    senders: Vec<oneshot::Sender<Device>>,
}

/// Waits for devices to join the tailnet, for all jobs at once.
#[derive(Clone)]
pub struct DeviceWatcher {
    state: Arc<Mutex<HashMap<String, DeviceWaiter>>>,
    wake: Arc<Notify>,
}

impl DeviceWatcher {
    pub fn start(tailscale: TailscaleClient, settings: WatchSettings) -> Self {
        let state = Arc::new(Mutex::new(HashMap::new()));
        let wake = Arc::new(Notify::new());
        tokio::spawn(device_loop(
            Arc::downgrade(&state),
            wake.clone(),
            tailscale,
            settings,
        ));
        DeviceWatcher { state, wake }
    }

    /// Resolves with the device that joined as `hostname`: carrying all of `tags`, authorized,
    /// with a 100.x address.
    pub async fn wait(&self, hostname: &str, tags: &[String]) -> Device {
        let (tx, rx) = oneshot::channel();
        lock(&self.state)
            .entry(hostname.to_owned())
            .or_insert_with(|| DeviceWaiter {
                tags: tags.to_vec(),
                senders: Vec::new(),
            })
            .senders
            .push(tx);
        self.wake.notify_one();
        match rx.await {
            Ok(device) => device,
            Err(_) => std::future::pending().await,
        }
    }
}

/// Whether `d` is the enrolled device for a waiter: hostname, tags, authorized, tailnet IPv4.
pub fn enrolled(d: &Device, hostname: &str, tags: &[String]) -> bool {
    d.hostname == hostname
        && d.authorized
        && tags.iter().all(|t| d.tags.contains(t))
        && d.ipv4_100().is_some()
}

async fn device_loop(
    state: Weak<Mutex<HashMap<String, DeviceWaiter>>>,
    wake: Arc<Notify>,
    tailscale: TailscaleClient,
    settings: WatchSettings,
) {
    let mut interval = settings.min_interval;
    loop {
        let tags = {
            let Some(state) = state.upgrade() else { return };
            let mut s = lock(&state);
            s.retain(|_, w| {
                w.senders.retain(|tx| !tx.is_closed());
                !w.senders.is_empty()
            });
            s.values().next().map(|w| w.tags.clone())
        };
        let Some(tags) = tags else {
            interval = settings.min_interval;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        };
        // A new waiter shortens the wait but still waits `min_interval`, so that jobs registering
        // together share one listing.
        tokio::select! {
            _ = wake.notified() => {
                interval = settings.min_interval;
                tokio::time::sleep(interval).await;
            }
            _ = tokio::time::sleep(interval) => {}
        }
        let filter = DeviceFilter {
            hostname: None,
            tags: tags.clone(),
        };
        let result = tailscale.list_devices(&filter).await;
        let Some(state) = state.upgrade() else { return };
        let mut s = lock(&state);
        let mut delivered = false;
        match result {
            Ok(devices) => {
                let hostnames: Vec<String> = s.keys().cloned().collect();
                for h in hostnames {
                    let wanted = &s[&h].tags;
                    // Newest first: a hostname reused by a later attempt wins.
                    let found = devices
                        .iter()
                        .filter(|d| enrolled(d, &h, wanted))
                        .max_by_key(|d| d.created);
                    if let Some(d) = found
                        && let Some(w) = s.remove(&h)
                    {
                        for tx in w.senders {
                            let _ = tx.send(d.clone());
                        }
                        delivered = true;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing tailnet devices failed; will retry"),
        }
        interval = if delivered {
            settings.min_interval
        } else {
            interval.mul_f64(1.5).min(settings.device_max_interval)
        };
    }
}
