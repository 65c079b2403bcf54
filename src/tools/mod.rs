//! The tools for people, on top of everything else: the command line (`cli`, the arguments;
//! `commands`, their bodies), `demo`, the benchmarks (`bench`), the reliability suite (`chaos`),
//! and what they share (`scratch` databases, `sim_clients`: the clients pointed at the
//! simulator). Nothing below imports from here. Must not: run inside `serve`.

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod scratch;
pub mod sim_clients;
