//! An HTTP origin in a lab node: nginx serving a document root (the HTTP
//! front end's real peer), and files published into it.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::{procs::Procs, Lab};

/// Start nginx (`nginx-light`) in `node` as process `nginx` of `procs`,
/// serving `root` on port 80 (one process, no daemon, logs and temp files in
/// the lab directory); returns once it accepts connections.
pub fn start_nginx(lab: &Lab, procs: &mut Procs, node: &str, root: &Path) -> Result<()> {
    let dir = lab.dir.path().join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  sendfile on;\n  types {{ application/octet-stream raw; }}\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 80;\n    root {};\n  }}\n}}\n",
        root.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    procs.spawn_program(
        lab,
        "nginx",
        node,
        &[
            "nginx",
            "-p",
            dir.to_str().context("path")?,
            "-c",
            path.to_str().context("path")?,
        ],
    )?;
    let addr = SocketAddr::from((lab.addr4(node), 80));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = lab.in_node(node, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nginx did not start: {}", procs.log("nginx"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write `data` as `root/name`, modified `age` ago (so an agent finds it
/// settled, and a rewrite gets another modification second: a new `ETag`).
pub fn publish(root: &Path, name: &str, data: &[u8], age: Duration) -> Result<()> {
    let path = root.join(name);
    std::fs::write(&path, data)?;
    std::fs::File::options()
        .write(true)
        .open(&path)?
        .set_modified(SystemTime::now() - age)?;
    Ok(())
}
