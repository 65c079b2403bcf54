//! The steps `key_minted` and `vm_created`: adopt the job's server if an earlier attempt made
//! one, else mint a single-use key and create the server, trying the region's locations in
//! order. A create is never repeated blindly: an unclear outcome is resolved by label, a taken
//! name is adopted. Must not: create twice, or keep a key usable that the job will not use.

use super::attempt::Attempt;
use super::cloud_init;
use super::keys::revoke_job_keys;
use super::naming::{MANAGED_BY, job_selector, key_description, server_name};
use super::retry::step_policy;
use super::stop::{Stop, hetzner_stop, tailscale_stop};
use crate::clients::hetzner::{
    CreateServerRequest, CreateServerResponse, ErrorClass, HetznerClient, HetznerError,
    PublicNetRequest, Server, ServerQuery, ServerStatus,
};
use crate::clients::retry::{Verdict, retry};
use crate::clients::tailscale::{AuthKey, CreateKey, DeviceFilter, TailscaleError};
use crate::domain::Step;
use crate::queue::StepFields;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// A failed mint, and which part of it failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}")]
struct MintFailure {
    what: &'static str,
    error: TailscaleError,
}

/// A create's outcome once resolved.
enum Made {
    Created(Box<CreateServerResponse>),
    /// The create failed in transit, but the server exists.
    Found(Server),
}

/// The job's live server, if any (the oldest, when a bug ever made two).
async fn find_job_server(h: &HetznerClient, job_id: Uuid) -> Result<Option<Server>, HetznerError> {
    let q = ServerQuery {
        label_selector: Some(job_selector(job_id)),
        name: None,
    };
    let mut found = h.list_servers(&q).await?;
    found.retain(|s| s.status != ServerStatus::Deleting);
    found.sort_by_key(|s| (s.created, s.id));
    Ok(found.into_iter().next())
}

impl Attempt<'_> {
    /// `key_minted` and `vm_created`: adopt the job's server, or mint a key and create it.
    pub(super) async fn server(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let s = &p.inner.settings;
        let name = server_name(self.job.id);
        let resumed = self.job.tailscale_key_id.is_some() || self.job.retry_count > 0;
        if resumed {
            self.check(Step::VmCreated.as_str())?;
            if let Some(found) = self.find_server().await? {
                return self
                    .adopt(found, "adopted the server of an earlier attempt")
                    .await;
            }
        }

        self.check(Step::KeyMinted.as_str())?;
        p.failpoint("before_key")?;
        if self.job.tailscale_key_id.is_some() {
            // A server of an earlier attempt may have joined under this name and been lost
            // since: its device would be mistaken for the new one.
            self.delete_stale_devices(&name).await?;
        }
        let key = self.mint_key(resumed).await?;
        p.failpoint("after_key")?;
        self.checkpoint(
            Step::KeyMinted,
            format!("minted single-use auth key {}", key.id),
            json!({ "key_id": key.id, "expires": key.expires }),
            StepFields {
                tailscale_key_id: Some(Some(key.id.clone())),
                server_name: Some(name.clone()),
                ..StepFields::default()
            },
        )
        .await?;
        let user_data =
            cloud_init::user_data(&name, key.key.expose(), &s.tags).map_err(|e| Stop::Fatal {
                error: e.to_string(),
                step: Step::VmCreated.as_str(),
            })?;
        drop(key);
        self.create(name, user_data).await
    }

    /// `vm_created`: the server, in the first location of the job's region that has capacity;
    /// a taken name or an unclear outcome adopts the job's server instead.
    async fn create(&mut self, name: String, user_data: String) -> Result<(), Stop> {
        let p = self.p;
        let h = &p.inner.hetzner;
        let s = &p.inner.settings;
        let locations = s
            .regions
            .0
            .get(&self.job.region)
            .cloned()
            .ok_or_else(|| Stop::Fatal {
                error: format!("region {:?} is not configured", self.job.region),
                step: Step::VmCreated.as_str(),
            })?;
        let labels = BTreeMap::from([
            ("managed-by".to_owned(), MANAGED_BY.to_owned()),
            ("job".to_owned(), self.job.id.to_string()),
        ]);
        let mut no_capacity = Vec::new();
        for location in &locations {
            self.check(Step::VmCreated.as_str())?;
            p.failpoint("before_create")?;
            let request = CreateServerRequest {
                name: name.clone(),
                server_type: s.server_type.clone(),
                image: s.image.clone(),
                location: Some(location.clone()),
                user_data: Some(user_data.clone()),
                labels: labels.clone(),
                ssh_keys: s.ssh_keys.clone(),
                start_after_create: true,
                public_net: Some(PublicNetRequest {
                    enable_ipv4: true,
                    enable_ipv6: true,
                }),
            };
            match self.create_or_find(&request).await {
                Ok(Made::Created(created)) => {
                    p.failpoint("after_create")?;
                    let mut actions = vec![created.action.id];
                    actions.extend(created.next_actions.iter().map(|a| a.id));
                    let server = created.server;
                    return self
                        .record_server(
                            &server,
                            actions,
                            format!("created server {} in {location}", server.id),
                        )
                        .await;
                }
                Ok(Made::Found(server)) => {
                    return self
                        .adopt(server, "create failed but the server exists: adopted")
                        .await;
                }
                Err(e) => match e.class() {
                    ErrorClass::Adopt => {
                        // Never create again under this name: take over the one that exists.
                        let q = ServerQuery {
                            label_selector: None,
                            name: Some(name.clone()),
                        };
                        let found = h.list_servers(&q).await.map_err(|e| {
                            hetzner_stop(Step::VmCreated.as_str(), "look up the server by name", &e)
                        })?;
                        return match found.into_iter().next() {
                            Some(server) => {
                                self.adopt(
                                    server,
                                    "name already taken: adopted the existing server",
                                )
                                .await
                            }
                            None => Err(Stop::Retry {
                                error: format!(
                                    "create said the name is taken but no server has it: {e}"
                                ),
                                step: Step::VmCreated.as_str(),
                            }),
                        };
                    }
                    ErrorClass::Relocate => {
                        tracing::warn!(location, error = %e, "no capacity; trying the next location");
                        no_capacity.push(location.clone());
                    }
                    _ => {
                        return Err(hetzner_stop(
                            Step::VmCreated.as_str(),
                            "create the server",
                            &e,
                        ));
                    }
                },
            }
        }
        Err(Stop::Retry {
            error: format!(
                "no capacity for {} in {}",
                s.server_type,
                no_capacity.join(", ")
            ),
            step: Step::VmCreated.as_str(),
        })
    }

    /// Mints the job's key. A mint is never repeated blindly: before minting again — on a
    /// resumed attempt (a crash or error may have come between an earlier mint and its
    /// checkpoint) and after a mint whose outcome is unknown (timeout, 5xx) — every valid key
    /// carrying the job's description is revoked. Transient failures are retried within the
    /// step's budget.
    async fn mint_key(&self, resumed: bool) -> Result<AuthKey, Stop> {
        let t = &self.p.inner.tailscale;
        let s = &self.p.inner.settings;
        let description = key_description(self.job.id);
        let request = CreateKey::single_use(description.clone(), s.key_expiry, s.tags.clone());
        let recorded = self.job.tailscale_key_id.clone();
        let clean_first = AtomicBool::new(resumed);
        let (description, request, recorded, clean_first) =
            (&description, &request, &recorded, &clean_first);
        let once = move || async move {
            if clean_first.load(Ordering::SeqCst) {
                revoke_job_keys(t, description, recorded.as_deref())
                    .await
                    .map_err(|error| MintFailure {
                        what: "revoke the job's earlier keys",
                        error,
                    })?;
            }
            // From here on a failure may have minted a key.
            clean_first.store(true, Ordering::SeqCst);
            t.create_auth_key(request)
                .await
                .map_err(|error| MintFailure {
                    what: "create the auth key",
                    error,
                })
        };
        retry(
            &step_policy(t.retry_policy()),
            Some(self.deadline),
            "mint the auth key",
            once,
            |f: &MintFailure| {
                if f.error.is_retryable() {
                    Verdict::Backoff
                } else {
                    Verdict::Stop
                }
            },
        )
        .await
        .map_err(|f| tailscale_stop(Step::KeyMinted.as_str(), f.what, &f.error))
    }

    /// One create, resolved if its outcome is unclear: after a transient failure (a timeout, a
    /// 5xx — the API may have acted before the answer was lost) the job's server is looked up
    /// by label before creating again, within the step's budget. Errors that are a verdict
    /// (`uniqueness_error`, no capacity, invalid input) are returned at once.
    async fn create_or_find(&self, request: &CreateServerRequest) -> Result<Made, HetznerError> {
        let h = &self.p.inner.hetzner;
        let job_id = self.job.id;
        let once = move || async move {
            match h.create_server(request).await {
                Ok(created) => Ok(Made::Created(Box::new(created))),
                Err(e) if e.class() == ErrorClass::Retryable => {
                    match find_job_server(h, job_id).await {
                        Ok(Some(server)) => Ok(Made::Found(server)),
                        // Not there (or the lookup failed too): the create may be repeated.
                        _ => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        };
        retry(
            &step_policy(h.retry_policy()),
            Some(self.deadline),
            "create the server",
            once,
            |e: &HetznerError| {
                if e.class() == ErrorClass::Retryable {
                    Verdict::Backoff
                } else {
                    Verdict::Stop
                }
            },
        )
        .await
    }

    async fn find_server(&self) -> Result<Option<Server>, Stop> {
        find_job_server(&self.p.inner.hetzner, self.job.id)
            .await
            .map_err(|e| hetzner_stop(Step::VmCreated.as_str(), "look up the job's server", &e))
    }

    async fn adopt(&mut self, server: Server, why: &str) -> Result<(), Stop> {
        self.record_server(&server, Vec::new(), format!("{why}: server {}", server.id))
            .await
    }

    /// The `vm_created` checkpoint, written the moment the server's id is known.
    async fn record_server(
        &mut self,
        server: &Server,
        actions: Vec<i64>,
        message: String,
    ) -> Result<(), Stop> {
        let ip = server.ipv4().map(str::to_owned);
        let location = server.location_name().map(str::to_owned);
        self.checkpoint(Step::VmCreated,
            message,
            json!({ "server_id": server.id, "server_ip": ip, "location": location, "actions": actions }),
            StepFields {
                server_name: Some(server_name(self.job.id)),
                server_id: Some(Some(server.id)),
                server_ip: Some(ip),
                location: Some(location),
                pending_action_ids: Some(actions),
                ..StepFields::default()
            },
        )
        .await
    }

    /// Devices left by an earlier server of this job would be mistaken for the new one.
    async fn delete_stale_devices(&self, name: &str) -> Result<(), Stop> {
        let t = &self.p.inner.tailscale;
        let filter = DeviceFilter {
            hostname: Some(name.to_owned()),
            tags: Vec::new(),
        };
        let stale = t
            .list_devices(&filter)
            .await
            .map_err(|e| tailscale_stop(Step::KeyMinted.as_str(), "list stale devices", &e))?;
        for d in stale {
            t.delete_device(&d.node_id).await.map_err(|e| {
                tailscale_stop(Step::KeyMinted.as_str(), "delete a stale device", &e)
            })?;
        }
        Ok(())
    }
}
