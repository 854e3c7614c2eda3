//! The HTTP API refuses requests without a token, except `/metrics` and
//! `/healthz`: a real daemon in a namespace, called over its own loopback and
//! from a neighbour across a link; token rotation by editing the token file; and
//! the configurations the daemon refuses to start with (no namespace needed).

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use nearblock_lab::{nearblock_bin, ApplianceOptions, Lab};

/// library ─ core ─ rack1 ─ hv1: rack1's API is reached from core.
const TOPOLOGY: &str = r#"
[[node]]
name = "library"
role = "library"
[[node]]
name = "core"
role = "switch"
[[node]]
name = "rack1"
role = "appliance"
[[node]]
name = "hv1"
role = "hypervisor"
[[link]]
a = "library"
b = "core"
[[link]]
a = "core"
b = "rack1"
[[link]]
a = "rack1"
b = "hv1"
"#;

/// One HTTP reply: status, `WWW-Authenticate` (empty if none), body.
#[derive(Debug)]
struct Reply {
    status: u16,
    challenge: String,
    body: String,
}

/// `GET url` from inside `node`, with the first token of `token_file` if given.
fn get(lab: &Lab, node: &str, url: &str, token_file: Option<&Path>) -> Reply {
    const SCRIPT: &str = "import urllib.request,urllib.error,sys
h={}
if sys.argv[2]:
    h['Authorization']='Bearer '+open(sys.argv[2]).read().split()[0]
try:
    r=urllib.request.urlopen(urllib.request.Request(sys.argv[1],headers=h),timeout=5)
    code=r.status
except urllib.error.HTTPError as e:
    r=e
    code=e.code
print(code)
print(r.headers.get('WWW-Authenticate',''))
sys.stdout.write(r.read().decode())
";
    let token = token_file.map_or("", |p| p.to_str().unwrap());
    let o = lab
        .exec_ok(node, &["python3", "-c", SCRIPT, url, token])
        .expect("HTTP request");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = text.splitn(3, '\n');
    Reply {
        status: lines.next().unwrap_or("").trim().parse().unwrap_or(0),
        challenge: lines.next().unwrap_or("").trim().to_string(),
        body: lines.next().unwrap_or("").to_string(),
    }
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn the_api_answers_only_requests_with_a_token() {
    let mut lab = Lab::new(TOPOLOGY).expect("lab");
    lab.start_appliance(
        "rack1",
        ApplianceOptions {
            steer: false,
            extra_config: "[api]\nlisten = \"0.0.0.0:7878\"\n".into(),
        },
    )
    .expect("rack1 appliance");
    let read = lab.api_read_token_file();
    let admin = lab.api_admin_token_file();
    let wrong = lab.dir.path().join("wrong.token");
    private_file(&wrong, &format!("{}\n", "0f".repeat(32)));
    let rack1_from_core = lab.port_toward("rack1", "core").unwrap().v4;
    for (node, base) in [
        ("rack1", "http://127.0.0.1:7878".to_string()),
        ("core", format!("http://{rack1_from_core}:7878")),
    ] {
        let url = |path: &str| format!("{base}{path}");
        // Every route but the two open ones: no token, or a wrong one, is 401.
        for path in ["/status", "/links", "/costs?target=core", "/hosts"] {
            let r = get(&lab, node, &url(path), None);
            assert_eq!(r.status, 401, "{node} {path}: {r:?}");
            assert_eq!(r.challenge, "Bearer realm=\"nearblock\"", "{node} {path}");
            let r = get(&lab, node, &url(path), Some(&wrong));
            assert_eq!(r.status, 401, "{node} {path}: {r:?}");
            assert!(r.challenge.contains("invalid_token"), "{r:?}");
        }
        // A read token reads; an admin token reads too.
        for token in [&read, &admin] {
            let r = get(&lab, node, &url("/status"), Some(token));
            assert_eq!(r.status, 200, "{node}: {r:?}");
            let status: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(status["appliance"], "rack1");
            assert_eq!(get(&lab, node, &url("/links"), Some(token)).status, 200);
        }
        // Probes and scrapers hold no token.
        let r = get(&lab, node, &url("/healthz"), None);
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{node}");
        let r = get(&lab, node, &url("/metrics"), None);
        assert_eq!(r.status, 200, "{node}: {r:?}");
        assert!(
            r.body.contains("nearblock_splicer_accepted_total"),
            "{}",
            r.body
        );
    }

    // The CLI without a token says how to give one; with one it prints.
    let bin = nearblock_bin().unwrap();
    let o = lab
        .cmd("rack1", &[bin.to_str().unwrap(), "status"])
        .env_remove("NEARBLOCK_API_TOKEN_FILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--token-file"), "{err}");
    assert_eq!(
        lab.status("rack1").expect("status with token").appliance,
        "rack1"
    );

    // Rotation: the read file now holds only a new token. The old one is
    // refused and the new one accepted within the reload interval (2 s).
    let new = lab.dir.path().join("new.token");
    let o = lab
        .exec_ok(
            "rack1",
            &[
                bin.to_str().unwrap(),
                "api",
                "token",
                "new",
                "--out",
                new.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("new.token"));
    let old = lab.dir.path().join("old.token");
    std::fs::copy(&read, &old).unwrap();
    std::fs::copy(&new, &read).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = |t: &Path| get(&lab, "rack1", "http://127.0.0.1:7878/status", Some(t)).status;
    while status(&old) != 401 {
        assert!(
            Instant::now() < deadline,
            "the old token still works 10 s after it was removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&new), 200);
    assert_eq!(status(&admin), 200, "the admin file was not touched");
}

/// Run `nearblock run --check` on `config`: (success, stdout + stderr).
fn check(config: &str, dir: &Path) -> (bool, String) {
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).unwrap();
    let o = std::process::Command::new(nearblock_bin().unwrap())
        .args(["run", "--check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn the_daemon_refuses_an_exposed_api_without_usable_tokens() {
    let dir = nearblock_lab::tempdir::Dir::new("nb-api-auth").unwrap();
    let base = "[appliance]\nname = \"rack1\"\n[datapath]\ninterfaces = [\"eth0\"]\nsteer = false\n[api]\nlisten = \"0.0.0.0:7878\"\n";
    let (ok, text) = check(base, dir.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains("api.listen") && text.contains("no token is configured"),
        "{text}"
    );
    // A token file made by the CLI: accepted.
    let token = dir.path().join("read.token");
    let o = std::process::Command::new(nearblock_bin().unwrap())
        .args(["api", "token", "new", "--out", token.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let with_token = format!("{base}read_token_file = {:?}\n", token.to_str().unwrap());
    let (ok, text) = check(&with_token, dir.path());
    assert!(ok, "{text}");
    // Readable by others: refused, with the fix named.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = check(&with_token, dir.path());
    assert!(!ok && text.contains("chmod 600"), "{text}");
    // Not a token: refused, naming the file and line, not echoing the content.
    private_file(&token, "hunter2\n");
    let (ok, text) = check(&with_token, dir.path());
    assert!(
        !ok && text.contains("read.token") && text.contains("line 1"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
