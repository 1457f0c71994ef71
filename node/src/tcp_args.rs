//! Command-line options of the userspace TCP stack, shared by the site agent and `tunnelctl up`,
//! with the flow limits of [`crate::flow_args`].

use tunnel_core::netstack::{BufferLimits, Congestion, StackOptions};

/// How the node's userspace TCP stack sends and how much memory its flows may take.
#[derive(Debug, Clone, clap::Args)]
pub struct TcpArgs {
    /// Congestion control of the userspace TCP senders: bbr (keeps its rate on lossy links) or
    /// cubic (loss-based, as Linux's usual default).
    #[arg(long, env = "TUNNEL_TCP_CONGESTION", default_value = "bbr", value_parser = parse_congestion)]
    pub tcp_congestion: Congestion,
    /// Largest send or receive buffer of one TCP flow (buffers start at 128 KiB and grow while the
    /// flow uses them). Sizes take K, M, G (powers of 1024).
    #[arg(long, env = "TUNNEL_TCP_BUFFER_MAX", default_value = "8M", value_parser = parse_size)]
    pub tcp_buffer_max: usize,
    /// Buffer memory all TCP flows of one peer may hold together.
    #[arg(long, env = "TUNNEL_TCP_MEMORY_PER_PEER", default_value = "64M", value_parser = parse_size)]
    pub tcp_memory_per_peer: usize,
    /// Buffer memory all TCP flows of this node may hold together; new flows beyond it are refused.
    #[arg(long, env = "TUNNEL_TCP_MEMORY", default_value = "256M", value_parser = parse_size)]
    pub tcp_memory: usize,
    /// How many flows of each kind a peer and the node may hold.
    #[command(flatten)]
    pub flows: crate::flow_args::FlowArgs,
}

impl TcpArgs {
    /// The stack options these flags describe.
    pub fn options(&self) -> StackOptions {
        StackOptions {
            congestion: self.tcp_congestion,
            limits: BufferLimits {
                max: self.tcp_buffer_max,
                per_peer: self.tcp_memory_per_peer,
                per_node: self.tcp_memory,
                ..BufferLimits::default()
            }
            .sane(),
            flows: self.flows.limits(),
        }
    }
}

fn parse_congestion(s: &str) -> Result<Congestion, String> {
    s.parse()
}

/// `4096`, `512K`, `8M`, `8MiB`, `1G`: bytes, in powers of 1024.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: usize = n.parse().map_err(|_| format!("{s:?} is not a size (say 4096, 512K, 8M or 1G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return Err(format!("{s:?} is not a size (say 4096, 512K, 8M or 1G)")),
    };
    n.checked_mul(1usize << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        for (text, bytes) in
            [("4096", 4096), ("512K", 512 << 10), ("8M", 8 << 20), ("8MiB", 8 << 20), ("1g", 1 << 30)]
        {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "M", "8X", "-1", "8.5M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
