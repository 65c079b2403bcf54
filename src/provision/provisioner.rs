//! The provisioning handler's parts: both clients, the settings, the shared watchers, and the
//! optional failpoint hook. Cheap to clone. Must not: run a step (that is `attempt`).

use super::failpoint::Failpoint;
use super::settings::ProvisionSettings;
use super::stop::Stop;
use super::watch::{ActionWatcher, DeviceWatcher, WatchSettings};
use crate::clients::hetzner::HetznerClient;
use crate::clients::tailscale::TailscaleClient;
use std::sync::Arc;

#[derive(Clone)]
pub struct Provisioner {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) hetzner: HetznerClient,
    pub(super) tailscale: TailscaleClient,
    pub(super) settings: ProvisionSettings,
    pub(super) actions: ActionWatcher,
    pub(super) devices: DeviceWatcher,
    failpoint: Option<Failpoint>,
}

impl Provisioner {
    pub fn new(
        hetzner: HetznerClient,
        tailscale: TailscaleClient,
        settings: ProvisionSettings,
        watch: WatchSettings,
    ) -> Self {
        Provisioner {
            inner: Arc::new(Inner {
                actions: ActionWatcher::start(hetzner.clone(), watch.clone()),
                devices: DeviceWatcher::start(tailscale.clone(), watch),
                hetzner,
                tailscale,
                settings,
                failpoint: None,
            }),
        }
    }

    /// Installs a failpoint hook (tests and chaos drills only).
    pub fn with_failpoint(self, failpoint: Failpoint) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            hetzner: arc.hetzner.clone(),
            tailscale: arc.tailscale.clone(),
            settings: arc.settings.clone(),
            actions: arc.actions.clone(),
            devices: arc.devices.clone(),
            failpoint: None,
        });
        Provisioner {
            inner: Arc::new(Inner {
                failpoint: Some(failpoint),
                ..inner
            }),
        }
    }

    pub fn hetzner(&self) -> &HetznerClient {
        &self.inner.hetzner
    }

    pub fn tailscale(&self) -> &TailscaleClient {
        &self.inner.tailscale
    }

    pub fn settings(&self) -> &ProvisionSettings {
        &self.inner.settings
    }

    pub(super) fn failpoint(&self, name: &str) -> Result<(), Stop> {
        match &self.inner.failpoint {
            Some(f) if f(name) => Err(Stop::Crashed),
            _ => Ok(()),
        }
    }
}
