//! Profiling aid: holds the default lab with a monitor-only appliance on rack1 and
//! an iperf3 server in the library until killed, printing the shell commands to run
//! a transfer. `perf record -a` around the transfer shows where the datapath's time
//! goes (docs/benchmarks.md).

use std::time::Duration;

use anyhow::Result;
use nearblock_lab::{ApplianceOptions, Lab};

fn main() -> Result<()> {
    let steer = std::env::args().any(|a| a == "--steer");
    let attach = !std::env::args().any(|a| a == "--none");
    let mut lab = Lab::default_topology()?;
    if attach {
        lab.start_appliance(
            "rack1",
            ApplianceOptions {
                steer,
                ..Default::default()
            },
        )?;
    }
    let lib = lab.addr4(lab.library()).to_string();
    let mut srv = lab
        .cmd(lab.library(), &["iperf3", "-s", "-B", &lib])
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = std::env::var("SECS").unwrap_or_else(|_| "5".into());
    let o = lab.exec_ok("hv1", &["iperf3", "-c", &lib, "-t", &secs])?;
    println!(
        "{}",
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let _ = srv.kill();
    let _ = srv.wait();
    Ok(())
}
