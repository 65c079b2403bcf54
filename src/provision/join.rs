//! The steps `vm_running` and `network_configured`: wait (through the shared watchers) for the
//! server's actions and for it to run, powering it on if it stays off, then for its device to
//! join the tailnet. Must not: poll per job.

use super::attempt::Attempt;
use super::naming::server_name;
use super::stop::{Stop, hetzner_stop};
use crate::clients::hetzner::ServerStatus;
use crate::domain::Step;
use crate::queue::StepFields;
use serde_json::json;
use std::time::Duration;

impl Attempt<'_> {
    /// `vm_running`: the create and start actions finished and the server runs; a server left
    /// `off` is powered on (twice at most).
    pub(super) async fn vm_running(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let h = &p.inner.hetzner;
        let Some(id) = self.job.server_id else {
            return Err(Stop::Retry {
                error: "no server recorded".into(),
                step: Step::VmRunning.as_str(),
            });
        };
        let mut pending = self.job.pending_action_ids.clone();
        let mut failed_actions = Vec::new();
        let mut power_ons = 0;
        loop {
            let waits = pending.iter().map(|a| p.inner.actions.wait(*a));
            let done = self
                .wait(Step::VmRunning.as_str(), futures::future::join_all(waits))
                .await?;
            for a in done {
                if let Some(err) = a.error {
                    tracing::warn!(action = a.id, command = %a.command, code = %err.code, "action failed");
                    failed_actions.push(format!("{} ({})", a.command, err.code));
                }
            }
            self.check(Step::VmRunning.as_str())?;
            let server = h
                .get_server(id)
                .await
                .map_err(|e| hetzner_stop(Step::VmRunning.as_str(), "get the server", &e))?;
            let Some(server) = server else {
                // Gone (deleted behind our back): forget it, so the next attempt creates anew.
                self.checkpoint(
                    Step::KeyMinted,
                    format!("server {id} disappeared"),
                    json!({ "server_id": id }),
                    StepFields {
                        server_id: Some(None),
                        server_ip: Some(None),
                        pending_action_ids: Some(Vec::new()),
                        ..StepFields::default()
                    },
                )
                .await?;
                return Err(Stop::Retry {
                    error: format!("server {id} disappeared"),
                    step: Step::VmRunning.as_str(),
                });
            };
            match server.status {
                ServerStatus::Running => {
                    let ip = server
                        .ipv4()
                        .map(str::to_owned)
                        .or(self.job.server_ip.clone());
                    return self
                        .checkpoint(
                            Step::VmRunning,
                            format!("server {id} is running"),
                            json!({ "server_id": id, "failed_actions": failed_actions }),
                            StepFields {
                                server_ip: Some(ip),
                                pending_action_ids: Some(Vec::new()),
                                ..StepFields::default()
                            },
                        )
                        .await;
                }
                ServerStatus::Off if power_ons < 2 => {
                    power_ons += 1;
                    tracing::warn!(server.id = id, "server is off; powering it on");
                    let action = h.power_on(id).await.map_err(|e| {
                        hetzner_stop(Step::VmRunning.as_str(), "power the server on", &e)
                    })?;
                    pending = vec![action.id];
                }
                ServerStatus::Off => {
                    return Err(Stop::Fatal {
                        error: format!(
                            "server {id} stays off after {power_ons} power-ons ({})",
                            failed_actions.join(", ")
                        ),
                        step: Step::VmRunning.as_str(),
                    });
                }
                ServerStatus::Initializing | ServerStatus::Starting => {
                    pending = Vec::new();
                    self.wait(
                        Step::VmRunning.as_str(),
                        tokio::time::sleep(Duration::from_secs(1)),
                    )
                    .await?;
                }
                other => {
                    return Err(Stop::Retry {
                        error: format!("server {id} is {other:?}"),
                        step: Step::VmRunning.as_str(),
                    });
                }
            }
        }
    }

    /// `network_configured`: the device joined; record it.
    pub(super) async fn network(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let name = server_name(self.job.id);
        self.check(Step::NetworkConfigured.as_str())?;
        let device = self
            .wait(
                Step::NetworkConfigured.as_str(),
                p.inner.devices.wait(&name, &p.inner.settings.tags),
            )
            .await?;
        let ip = device.ipv4_100().map(|a| a.to_string());
        self.checkpoint(
            Step::NetworkConfigured,
            format!(
                "{name} joined the tailnet as {}",
                ip.as_deref().unwrap_or("?")
            ),
            json!({ "device_id": device.node_id, "tailscale_ip": ip }),
            StepFields {
                device_id: Some(Some(device.node_id.clone())),
                tailscale_ip: Some(ip),
                ..StepFields::default()
            },
        )
        .await?;
        Ok(())
    }
}
