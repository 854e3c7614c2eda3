//! `nearblock status`: ask a running daemon's API and print flows, counters and the
//! discovery table (or the raw JSON with `--json`).

use std::{io::Write, net::SocketAddr};

use anyhow::Context;

use crate::{config, daemon::StatusReport};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's API address (`[api] listen`).
    #[arg(long, default_value_t = config::default_api_listen())]
    pub api: SocketAddr,
    /// Print the JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let url = format!("http://{}/status", args.api);
    let body = ureq::get(&url)
        .call()
        .with_context(|| {
            format!(
                "no nearblock daemon answering at {} (is it running?)",
                args.api
            )
        })?
        .into_body()
        .read_to_string()
        .context("reading the status reply")?;
    if args.json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let r: StatusReport = serde_json::from_str(&body).context("parsing the status reply")?;
    print_report(&r, out)
}

/// Human-readable status (pure formatting; tested).
pub fn print_report(r: &StatusReport, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "appliance {}  steering {}  up {}s",
        r.appliance,
        if r.steering {
            "on"
        } else {
            "off (monitor-only)"
        },
        r.uptime_secs
    )?;
    let s = &r.splicer;
    writeln!(
        out,
        "splicer: {} accepted, {} active, {} upstream failures, {} B to target, {} B to initiator",
        s.accepted, s.active, s.upstream_failed, s.bytes_to_target, s.bytes_to_initiator
    )?;
    writeln!(out, "\ninterfaces:")?;
    for i in &r.interfaces {
        let util = i
            .rate
            .utilization
            .map(|u| format!("  util {:.1}%", u * 100.0))
            .unwrap_or_default();
        writeln!(
            out,
            "  {:<12} rx {:>14} B {:>10} pkts {:>9.1} Mb/s   tx {:>14} B {:>10} pkts {:>9.1} Mb/s{util}",
            i.interface,
            i.rx_bytes,
            i.rx_packets,
            i.rate.rx_bps / 1e6,
            i.tx_bytes,
            i.tx_packets,
            i.rate.tx_bps / 1e6
        )?;
    }
    writeln!(
        out,
        "\nflows (counted where they enter: payload B, of which retransmitted, frame B, packets):"
    )?;
    for f in &r.flows {
        writeln!(
            out,
            "  {:<10} {:>40} -> {:<40} {:>14} {:>10} {:>14} {:>9}",
            f.interface, f.src, f.dst, f.payload_bytes, f.retrans_bytes, f.frame_bytes, f.packets
        )?;
    }
    writeln!(out, "\nverdicts:")?;
    for (name, v) in r.verdicts.iter().filter(|(_, v)| *v > 0) {
        writeln!(out, "  {name:<28} {v}")?;
    }
    writeln!(
        out,
        "\ndiscovery (initiator address, initiator IQN, target IQN):"
    )?;
    for d in &r.discovery {
        writeln!(
            out,
            "  {:<40} {:<40} {:<40} {} logins via {}",
            d.initiator_addr,
            d.initiator_iqn,
            if d.target_iqn.is_empty() {
                "(discovery session)"
            } else {
                &d.target_iqn
            },
            d.logins,
            d.portal
        )?;
    }
    Ok(())
}
