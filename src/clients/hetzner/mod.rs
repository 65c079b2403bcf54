//! Hetzner Cloud API client: servers, actions, server types and locations.
//!
//! Layout: `config` (where and how patiently to call), `error` (what a failure means, by
//! `error.code`), `models` (the wire types we read and send), `labels` (the rules a create is
//! checked against before it is sent), `client` (the calls, the rate budget, retries of
//! idempotent calls). Must not: know about jobs, or retry a create (see `client`).

mod client;
mod config;
mod error;
mod labels;
mod models;

pub use client::HetznerClient;
pub use config::HetznerConfig;
pub use error::{ErrorClass, HetznerError};
pub use labels::{validate_label_key, validate_label_value};
pub use models::{
    Action, ActionError, ActionStatus, CreateServerRequest, CreateServerResponse, Ipv4, Location,
    NamedRef, PublicNet, PublicNetRequest, Server, ServerQuery, ServerStatus, ServerType,
    ServerTypeLocation,
};
