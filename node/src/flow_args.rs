//! Command-line limits on the flows one peer and the whole node may hold, shared by the site agent
//! and `tunnelctl up` (flattened into [`crate::tcp_args::TcpArgs`]).
//!
//! The TCP memory budget (`--tcp-memory-per-peer`, `--tcp-memory`) bounds what flows' buffers take;
//! these bound what their count costs besides: on a site each TCP flow holds a connection to its
//! target, each SYN a dial while it waits for one, each UDP flow a socket and a task.

use tunnel_core::netstack::FlowLimits;

/// How many flows of each kind one peer and the node may hold at once. A refused TCP flow gets a
/// reset, a refused UDP flow's datagrams are dropped; both are counted
/// (`tunnel_node_flows_refused_total`).
#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    /// TCP connections of one peer whose targets are being dialled at once (a SYN waits for its
    /// target's answer for up to 10 s).
    #[arg(long, env = "TUNNEL_MAX_PENDING_DIALS_PER_PEER", default_value_t = 64, value_parser = at_least_one)]
    pub max_pending_dials_per_peer: usize,
    /// Target dials at once over all peers.
    #[arg(long, env = "TUNNEL_MAX_PENDING_DIALS", default_value_t = 1024, value_parser = at_least_one)]
    pub max_pending_dials: usize,
    /// Open TCP flows of one peer (at the default --tcp-memory-per-peer, 64 MiB, the memory budget
    /// binds first: a flow takes at least 256 KiB of it).
    #[arg(long, env = "TUNNEL_MAX_TCP_FLOWS_PER_PEER", default_value_t = 1024, value_parser = at_least_one)]
    pub max_tcp_flows_per_peer: usize,
    /// Open TCP flows of this node.
    #[arg(long, env = "TUNNEL_MAX_TCP_FLOWS", default_value_t = 4096, value_parser = at_least_one)]
    pub max_tcp_flows: usize,
    /// UDP flows (one per source and destination port pair, ended after 60 s of silence) of one peer.
    #[arg(long, env = "TUNNEL_MAX_UDP_FLOWS_PER_PEER", default_value_t = 256, value_parser = at_least_one)]
    pub max_udp_flows_per_peer: usize,
    /// UDP flows of this node.
    #[arg(long, env = "TUNNEL_MAX_UDP_FLOWS", default_value_t = 4096, value_parser = at_least_one)]
    pub max_udp_flows: usize,
}

impl FlowArgs {
    /// The limits these flags describe (a per-peer figure above its node total is cut to it).
    pub fn limits(&self) -> FlowLimits {
        FlowLimits {
            pending_dials_per_peer: self.max_pending_dials_per_peer,
            pending_dials: self.max_pending_dials,
            tcp_per_peer: self.max_tcp_flows_per_peer,
            tcp: self.max_tcp_flows,
            udp_per_peer: self.max_udp_flows_per_peer,
            udp: self.max_udp_flows,
        }
        .sane()
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a count of at least 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flows: FlowArgs,
    }

    #[test]
    fn defaults_match_the_core_defaults_and_flags_override_them() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.flows.limits(), FlowLimits::default());
        let cli =
            Cli::try_parse_from(["x", "--max-udp-flows-per-peer", "9", "--max-pending-dials", "3"]).unwrap();
        let l = cli.flows.limits();
        assert_eq!((l.udp_per_peer, l.pending_dials, l.pending_dials_per_peer), (9, 3, 3));
        assert!(Cli::try_parse_from(["x", "--max-tcp-flows", "0"]).is_err());
    }
}
