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

/// One declared LUN: served or not (why), where its manifest is from, what it is.
pub fn lun_line(l: &crate::splice::catalog::LunStatus) -> String {
    let state = if l.served {
        "served".to_string()
    } else {
        format!("NOT served ({})", l.why.as_deref().unwrap_or("?"))
    };
    let manifest = match (&l.image, &l.digest) {
        (Some(image), Some(d)) => format!(
            "manifest {image} {} B, {} blocks of {} B, #{} {} from {}",
            l.size,
            l.blocks,
            l.block_size,
            l.manifest_seq,
            &d[..d.len().min(16)],
            l.origin
                .map(|o| format!("{o:?}").to_lowercase())
                .unwrap_or_default(),
        ),
        _ => "no manifest".into(),
    };
    let error = l
        .last_error
        .as_deref()
        .map(|e| format!("; last lookup failed: {e}"))
        .unwrap_or_default();
    format!(
        "{}/{}  {state}  [{}]  {manifest}{error}",
        l.target, l.lun, l.source
    )
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
    if !s.luns.is_empty() {
        writeln!(out, "\nserved LUNs (declared):")?;
        for l in &s.luns {
            writeln!(out, "  {}", lun_line(l))?;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::catalog::{LunStatus, ManifestOrigin};

    #[test]
    fn lun_lines_say_whether_and_why() {
        let mut l = LunStatus {
            target: "iqn.t:lib".into(),
            lun: 1,
            source: "index iqn.t:lib/1".into(),
            why: Some("no manifest yet".into()),
            ..Default::default()
        };
        assert_eq!(
            lun_line(&l),
            "iqn.t:lib/1  NOT served (no manifest yet)  [index iqn.t:lib/1]  no manifest"
        );
        l.served = true;
        l.why = None;
        l.image = Some("iqn.t:lib/1".into());
        (l.size, l.blocks, l.block_size, l.manifest_seq) = (8192, 2, 4096, 3);
        l.digest = Some("ab".repeat(32));
        l.origin = Some(ManifestOrigin::Parent);
        l.last_error = Some("parent index: timed out".into());
        assert_eq!(
            lun_line(&l),
            "iqn.t:lib/1  served  [index iqn.t:lib/1]  manifest iqn.t:lib/1 8192 B, 2 blocks of 4096 B, #3 abababababababab from parent; last lookup failed: parent index: timed out"
        );
    }
}
