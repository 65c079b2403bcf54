//! A faithful local stand-in for the Hetzner Cloud and Tailscale APIs (issue #3).

/// Arguments of `provisiond sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
}

/// Runs the simulator until ctrl-c / SIGTERM.
pub async fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("the simulator is not built yet")
}
