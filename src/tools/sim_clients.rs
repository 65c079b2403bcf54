//! The production clients and step machine pointed at the simulator: what the demo, the
//! benchmarks, the chaos suite and the tests use to talk to a `SimHandle`. It lives here, above
//! both, so that the simulator imports nothing of the clients it stands in for and the clients
//! nothing of it. Must not: be used by `serve` (which reads its endpoints from the config).

use crate::clients::hetzner::{HetznerClient, HetznerConfig};
use crate::clients::tailscale::{TailscaleClient, TailscaleConfig};
use crate::config::Regions;
use crate::provision::watch::WatchSettings;
use crate::provision::{ProvisionSettings, Provisioner};
use crate::sim::SimHandle;
use std::time::Duration;

/// Client configurations for a running simulator.
pub trait SimClients {
    /// A Hetzner client configuration pointing at this simulator with its first token.
    fn hetzner_config(&self) -> HetznerConfig;
    /// A Tailscale client configuration pointing at this simulator with its OAuth client and
    /// tags.
    fn tailscale_config(&self) -> TailscaleConfig;
}

impl SimClients for SimHandle {
    fn hetzner_config(&self) -> HetznerConfig {
        HetznerConfig::new(self.hetzner_base_url(), self.hetzner_token())
    }

    fn tailscale_config(&self) -> TailscaleConfig {
        let cfg = self.config();
        TailscaleConfig::new(
            self.tailscale_base_url(),
            cfg.tailscale_client_id.clone(),
            cfg.tailscale_client_secret.clone(),
            cfg.tailscale_tags.clone(),
        )
    }
}

/// The real step machine, with the daemon's production polling settings, against `sim`.
pub fn simulated_provisioner(sim: &SimHandle) -> Provisioner {
    Provisioner::new(
        HetznerClient::new(sim.hetzner_config()),
        TailscaleClient::new(sim.tailscale_config()),
        ProvisionSettings {
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            ssh_keys: Vec::new(),
            regions: Regions::default(),
            tags: sim.config().tailscale_tags.clone(),
            key_expiry: Duration::from_secs(3600),
            deadline: Duration::from_secs(900),
            rollback_timeout: Duration::from_secs(60),
        },
        WatchSettings::default(),
    )
}
