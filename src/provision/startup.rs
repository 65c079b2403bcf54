//! The startup check of the configured server type against the Hetzner API: which locations of
//! each region may be used. Must not: treat a transient error as a verdict.

use super::settings::ProvisionSettings;
use crate::clients::hetzner::{ErrorClass, HetznerClient, HetznerError};
use crate::config::Regions;
use std::collections::BTreeMap;

/// Why the startup check of the server type failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupCheckError {
    /// The API did not answer usefully; `transient()` tells whether asking again may help.
    #[error("hetzner: {0}")]
    Api(#[from] HetznerError),
    /// A definitive answer: the type is unknown, or unusable in every location of a region.
    #[error("{0}")]
    Unusable(String),
}

impl StartupCheckError {
    /// Worth asking again (5xx, timeout, 429): not a verdict on the configuration.
    pub fn transient(&self) -> bool {
        matches!(self, StartupCheckError::Api(e) if e.class() == ErrorClass::Retryable)
    }
}

/// Startup check: the configured server type exists and is usable (not deprecated, available)
/// in at least one location of every region. Returns the regions with the unusable locations
/// removed (so that jobs do not try them); a region left with none is an error.
pub async fn usable_regions(
    hetzner: &HetznerClient,
    settings: &ProvisionSettings,
) -> Result<Regions, StartupCheckError> {
    let types = hetzner.list_server_types().await?;
    let Some(t) = types.iter().find(|t| t.name == settings.server_type) else {
        return Err(StartupCheckError::Unusable(format!(
            "hetzner.server_type {:?} does not exist in this project (known: {})",
            settings.server_type,
            types
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let mut usable = Regions(BTreeMap::new());
    for (region, locations) in &settings.regions.0 {
        let (ok, bad): (Vec<String>, Vec<String>) =
            locations.iter().cloned().partition(|l| t.usable_in(l));
        if ok.is_empty() {
            return Err(StartupCheckError::Unusable(format!(
                "hetzner.server_type {:?} is deprecated or unavailable in every location of region {region} ({}); pick another type or location",
                settings.server_type,
                locations.join(", ")
            )));
        }
        if !bad.is_empty() {
            tracing::warn!(region, locations = %bad.join(", "), server_type = %settings.server_type, "server type unusable there; skipping those locations");
        }
        usable.0.insert(region.clone(), ok);
    }
    Ok(usable)
}
