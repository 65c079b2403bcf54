//! HTTP clients for the Hetzner Cloud and Tailscale APIs (issue #3).
