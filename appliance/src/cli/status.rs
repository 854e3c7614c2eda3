//! `nearblock status`: ask a running daemon's API and print flows, counters and the
//! discovery table (or the raw JSON with `--json`).

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;

use crate::{api::auth::TOKEN_FILE_ENV, config, state::StatusReport};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's API address (`[api] listen`).
    #[arg(long, default_value_t = config::default_api_listen())]
    pub api: SocketAddr,
    #[command(flatten)]
    pub token: TokenArgs,
    /// Print the JSON report.
    #[arg(long)]
    pub json: bool,
}

/// Where a command that calls the API finds its token.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// A file holding an API token (a line of `[api] read_token_file`; mode
    /// 0600) [default: `$NEARBLOCK_API_TOKEN_FILE`].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// `--token-file`, else the environment's, else none.
    pub fn path(&self) -> Option<PathBuf> {
        self.token_file
            .clone()
            .or_else(|| std::env::var_os(TOKEN_FILE_ENV).map(PathBuf::from))
    }
}

pub fn run(args: &StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let body = api_get(args.api, "/status", args.token.path().as_deref())?;
    if args.json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let r: StatusReport = serde_json::from_str(&body).context("parsing the status reply")?;
    print_report(&r, out)
}

/// `GET path` on the daemon at `api` with the token in `token_file` (if any);
/// the body of a 200, else an error that says what to do.
pub fn api_get(api: SocketAddr, path: &str, token_file: Option<&Path>) -> anyhow::Result<String> {
    api_call(api, "GET", path, token_file, None)
}

/// `POST path` with a JSON `body`; the body of a 200 or 202.
pub fn api_post(
    api: SocketAddr,
    path: &str,
    token_file: Option<&Path>,
    body: &serde_json::Value,
) -> anyhow::Result<String> {
    api_call(api, "POST", path, token_file, Some(body))
}

fn api_call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token_file: Option<&Path>,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<String> {
    let token = token_file
        .map(crate::api::auth::read_client_token)
        .transpose()?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{api}{path}");
    let auth = token.as_ref().map(|t| format!("Bearer {t}"));
    let resp = if method == "POST" {
        let mut req = agent.post(&url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        req.send_json(body.cloned().unwrap_or(serde_json::Value::Null))
    } else {
        let mut req = agent.get(&url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        req.call()
    }
    .with_context(|| format!("no nearblock daemon answering at {api} (is it running?)"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the reply to {path}"))?;
    match status {
        200 | 202 => Ok(body),
        _ => Err(anyhow::anyhow!(refusal(
            api,
            path,
            status,
            token.is_some(),
            &body
        ))),
    }
}

/// What to tell the user when the daemon did not answer 200.
fn refusal(api: SocketAddr, path: &str, status: u16, had_token: bool, body: &str) -> String {
    // Refusals and the v1 routes answer `{"code": "…", "message": "…"}`.
    let error = serde_json::from_str::<crate::api::error::ErrorBody>(body)
        .ok()
        .map(|e| e.message);
    let body = error.as_deref().unwrap_or(body);
    match (status, had_token) {
        (401, false) => format!(
            "the daemon at {api} wants an API token: pass --token-file FILE or set \
             {TOKEN_FILE_ENV} (FILE holds a line of the daemon's [api] read_token_file)"
        ),
        (401, true) => format!(
            "the daemon at {api} refused the token: it is in neither of its [api] token files"
        ),
        (403, _) => format!("the daemon at {api} refused {path}: {}", body.trim()),
        _ => format!("{path} on {api}: HTTP {status}: {}", body.trim()),
    }
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
            "manifest {image} {} B, {} blocks of {} B, #{} {} from {}{}",
            l.size,
            l.blocks,
            l.block_size,
            l.manifest_seq,
            &d[..d.len().min(16)],
            l.origin
                .map(|o| format!("{o:?}").to_lowercase())
                .unwrap_or_default(),
            l.authority
                .as_deref()
                .map(|a| format!(", {a}'s holding"))
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
            "  {:<12} {:<11} rx {:>14} B {:>10} pkts {:>9.1} Mb/s   tx {:>14} B {:>10} pkts {:>9.1} Mb/s{util}",
            i.interface,
            i.classifier.as_deref().unwrap_or("-"),
            i.rx_bytes,
            i.rx_packets,
            i.rate.rx_bps / 1e6,
            i.tx_bytes,
            i.tx_packets,
            i.rate.tx_bps / 1e6
        )?;
        if !i.tc_ingress.is_empty() || !i.tc_egress.is_empty() {
            writeln!(
                out,
                "  {:<12} tc ingress: {}; tc egress: {}",
                "",
                i.tc_ingress.join(", "),
                i.tc_egress.join(", ")
            )?;
        }
    }
    if !r.served_portals.is_empty() {
        writeln!(
            out,
            "\nserved portals (new connections steered): {}",
            r.served_portals.join(", ")
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
    fn refusals_say_what_to_do() {
        let api = config::default_api_listen();
        let e = refusal(api, "/status", 401, false, "");
        assert!(
            e.contains("--token-file") && e.contains(TOKEN_FILE_ENV),
            "{e}"
        );
        let e = refusal(api, "/status", 401, true, "");
        assert!(e.contains("refused the token"), "{e}");
        let e = refusal(
            api,
            "/jobs",
            403,
            true,
            "this route needs a token of scope admin\n",
        );
        assert!(e.contains("scope admin"), "{e}");
        let e = refusal(api, "/costs", 404, true, "no [cost] section configured");
        assert!(e.contains("HTTP 404") && e.contains("no [cost]"), "{e}");
    }

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
        l.authority = Some("library".into());
        l.last_error = Some("parent index: timed out".into());
        assert_eq!(
            lun_line(&l),
            "iqn.t:lib/1  served  [index iqn.t:lib/1]  manifest iqn.t:lib/1 8192 B, 2 blocks of 4096 B, #3 abababababababab from parent, library's holding; last lookup failed: parent index: timed out"
        );
    }
}
