//! What the step machine needs from the configuration. Must not: hold a secret.

use crate::config::Regions;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ProvisionSettings {
    pub server_type: String,
    pub image: String,
    pub ssh_keys: Vec<String>,
    pub regions: Regions,
    pub tags: Vec<String>,
    pub key_expiry: Duration,
    pub deadline: Duration,
    pub rollback_timeout: Duration,
}

impl ProvisionSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        ProvisionSettings {
            server_type: c.hetzner.server_type.clone(),
            image: c.hetzner.image.clone(),
            ssh_keys: c.hetzner.ssh_keys.clone(),
            regions: c.regions.clone(),
            tags: c.tailscale.tags.clone(),
            key_expiry: c.tailscale.key_expiry,
            deadline: c.provision.deadline,
            rollback_timeout: c.provision.rollback_timeout,
        }
    }
}
