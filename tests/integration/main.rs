//! All black-box integration tests in one binary: one link instead of two dozen (a one-line
//! change relinks one executable). Each module is one former `tests/<name>.rs`; the shared
//! harness is `support` (a database per test) and `http_support` (a served daemon).

mod adopt;
mod attempt_errors;
mod chaos;
mod cli;
mod clients_hetzner;
mod clients_rate_budget;
mod clients_tailscale;
mod config;
mod http_api;
mod http_config;
mod http_fuzz;
mod http_logs;
mod http_openapi;
mod http_runner;
mod http_serve;
mod http_stripe;
mod http_support;
mod instances;
mod migrations;
mod observability;
mod provision;
mod queue;
mod serve;
mod sim_api;
mod sim_bench;
mod sim_enrollment;
mod sim_openapi;
mod support;
mod upgrade;
mod webapp;
mod worker;
