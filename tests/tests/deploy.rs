//! The deployment files under `deploy/`, checked without a real host:
//!
//! - `deploy/agent/install.sh --root DIR --no-start --no-enroll` into a fake
//!   cPanel root (fake `/etc/os-release`, `/etc/exim.conf`, CSF files): files
//!   land with the right modes, the generated config passes `fleetban-agent
//!   check-config` with `smtp_accept_max` and the allowlist carried over, a
//!   re-run changes nothing, an upgrade replaces only the binary, and
//!   `--uninstall` restores the tree as it was; firewall detection on other
//!   roots;
//! - the systemd units (the installer's copy equals `deploy/systemd/`,
//!   `Type=notify`, hardening) and the package metadata's files;
//! - `deploy/compose/` (structure only: there is no Docker engine in CI).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleetban_agent::config::{AgentConfig, FirewallBackend};
use ipnet::IpNet;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn agent_bin() -> PathBuf {
    fleetban_tests::fleet::binaries().expect("workspace binaries").join("fleetban-agent")
}

/// Every entry under `root`: relative path -> (mode, content of files).
type Tree = BTreeMap<PathBuf, (u32, Option<Vec<u8>>)>;

fn tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("inside root").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(rel, (mode, None));
                walk(root, &path, out);
            } else {
                out.insert(rel, (mode, Some(std::fs::read(&path).expect("read"))));
            }
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn install(root: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(repo("deploy/agent/install.sh"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run install.sh")
}

fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "install.sh failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn mode(root: &Path, rel: &str) -> u32 {
    std::fs::metadata(root.join(rel)).unwrap_or_else(|error| panic!("{rel}: {error}")).permissions().mode() & 0o7777
}

/// A cPanel host on AlmaLinux 9 with CSF and a tuned Exim.
fn cpanel_root(root: &Path) {
    write(
        root,
        "etc/os-release",
        "NAME=\"AlmaLinux\"\nVERSION=\"9.4 (Seafoam Ocelot)\"\nID=\"almalinux\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.4\"\n",
    );
    write(
        root,
        "etc/exim.conf",
        "# cPanel exim.conf\nsmtp_accept_max_per_host = 20\n  smtp_accept_max = 150\nsmtp_accept_queue = 120\n",
    );
    write(root, "etc/csf/csf.conf", "TESTING = \"0\"\n");
    write(
        root,
        "etc/csf/csf.allow",
        "###############################################################################\n\
         # csf.allow\n\
         192.0.2.10 # cPanel: monitoring\n\
         198.51.100.7/24 # host bits set: the /24 is meant\n\
         tcp|in|d=25|s=203.0.113.9 # advanced filter\n\
         tcp|in|d=22|s=198.51.100.9 # ssh only\n\
         2001:DB8:0:0:1::1\n\
         2001:db8:abcd:12::/48\n\
         Include /etc/csf/cpanel.allow\n\
         not-an-address.example.com\n\
         300.1.2.3\n",
    );
    write(root, "etc/csf/cpanel.allow", "198.51.100.200 # included\n");
    write(root, "etc/csf/csf.ignore", "127.0.0.1\n::1\n203.0.113.77 # lfd ignore\n");
}

/// This machine's global addresses, as `ip` reports them (the installer adds
/// them to the allowlist); empty without `ip`.
fn global_addresses() -> Vec<IpAddr> {
    let Ok(output) = Command::new("ip").args(["-o", "addr", "show", "scope", "global"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .collect()
}

const SERVER: &str = "https://fleet.example.net:50051";

#[test]
fn installer_into_a_fake_root_is_idempotent_upgrades_and_uninstalls_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    cpanel_root(&root);
    let before = tree(&root);
    let bin = agent_bin();
    let bin_arg = bin.to_str().expect("utf-8");
    let args = ["--no-start", "--no-enroll", "--server", SERVER, "--binary", bin_arg];

    let stdout = ok(&install(&root, &args));
    assert!(stdout.contains("changed=yes"), "{stdout}");
    assert!(stdout.contains("firewall: csf (detected)"), "{stdout}");
    for (rel, expected) in [
        ("usr/local/bin/fleetban-agent", 0o755),
        ("etc/systemd/system/fleetban-agent.service", 0o644),
        ("etc/fleetban", 0o755),
        ("etc/fleetban/agent.toml", 0o640),
        ("var/lib/fleetban", 0o700),
    ] {
        assert_eq!(mode(&root, rel), expected, "mode of {rel}: {:o}", mode(&root, rel));
    }
    assert_eq!(std::fs::read(root.join("usr/local/bin/fleetban-agent")).unwrap(), std::fs::read(&bin).unwrap());
    // The installer's unit is deploy/systemd's, with the binary in /usr/local/bin.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/fleetban-agent.service")).unwrap();
    let expected_unit = read("deploy/systemd/fleetban-agent.service")
        .replace("/usr/bin/fleetban-agent", "/usr/local/bin/fleetban-agent");
    assert_eq!(unit, expected_unit, "install.sh's embedded unit drifted from deploy/systemd/fleetban-agent.service");

    // The generated config passes check-config and carries what was found.
    let config_path = root.join("etc/fleetban/agent.toml");
    let check = Command::new(&bin).arg("check-config").arg("--config").arg(&config_path).arg("--no-host").output();
    let check = check.expect("run check-config");
    assert!(check.status.success(), "check-config: {}", String::from_utf8_lossy(&check.stderr));
    let config = AgentConfig::load(&config_path).expect("generated config loads");
    assert_eq!(config.server, SERVER);
    assert_eq!(config.firewall.backend, FirewallBackend::Csf);
    assert_eq!(config.detect.smtp_accept_max, 150, "smtp_accept_max from /etc/exim.conf");
    assert_eq!(config.sources.len(), 1);
    assert_eq!(config.sources[0].path, Path::new("/var/log/exim_mainlog"));
    assert_eq!(config.state_dir, Path::new("/var/lib/fleetban"));
    let allow: Vec<IpNet> = config.allowlist.cidrs.iter().map(|entry| entry.0).collect();
    for expected in [
        "192.0.2.10/32",
        "198.51.100.0/24",
        "2001:db8::1:0:0:1/128",
        "2001:db8:abcd::/48",
        "198.51.100.200/32",
        "127.0.0.1/32",
        "::1/128",
        "203.0.113.77/32",
    ] {
        let net: IpNet = expected.parse().unwrap();
        assert!(allow.contains(&net), "{expected} missing from the allowlist {allow:?}");
    }
    for own in global_addresses() {
        assert!(allow.contains(&IpNet::from(own)), "own address {own} missing from the allowlist {allow:?}");
    }
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(!text.contains("not-an-address") && !text.contains("300.1.2.3"), "invalid CSF entries kept:\n{text}");
    // Port-restricted (advanced) CSF filters allow one port, not the address:
    // never allowlisted, and named as skipped.
    for restricted in ["203.0.113.9", "198.51.100.9"] {
        let net: IpNet = format!("{restricted}/32").parse().unwrap();
        assert!(!allow.contains(&net), "port-restricted {restricted} allowlisted: {allow:?}");
    }
    assert!(stdout.contains("skipped: tcp|in|d=22|s=198.51.100.9 (/etc/csf/csf.allow)"), "{stdout}");
    assert!(stdout.contains("skipped 2 port-restricted"), "{stdout}");
    assert!(text.contains("#   tcp|in|d=25|s=203.0.113.9 (/etc/csf/csf.allow)"), "{text}");

    // A re-run changes nothing, not even with --reconfigure (the config is
    // generated deterministically).
    let installed = tree(&root);
    let stdout = ok(&install(&root, &args));
    assert!(stdout.contains("changed=no"), "{stdout}");
    assert_eq!(tree(&root), installed, "a re-run changed the tree");
    let mut reconfigure = args.to_vec();
    reconfigure.push("--reconfigure");
    let stdout = ok(&install(&root, &reconfigure));
    assert!(stdout.contains("changed=no"), "{stdout}");
    assert_eq!(tree(&root), installed, "--reconfigure with the same facts changed the tree");

    // An upgrade (another binary) replaces the binary and keeps the config,
    // the enrollment and the spool.
    let credentials = root.join("var/lib/fleetban/credentials.json");
    std::fs::write(&credentials, "{\"agent_id\": \"kept\"}").unwrap();
    std::fs::create_dir_all(root.join("var/lib/fleetban/spool")).unwrap();
    std::fs::write(root.join("var/lib/fleetban/spool/00000001.seg"), "spooled").unwrap();
    let mut upgraded = std::fs::read(&bin).unwrap();
    upgraded.extend_from_slice(b"\0fleetban-upgrade-marker");
    let new_bin = dir.path().join("fleetban-agent-new");
    std::fs::write(&new_bin, &upgraded).unwrap();
    let stdout = ok(&install(
        &root,
        &["--no-start", "--no-enroll", "--binary", new_bin.to_str().unwrap(), "--server", "https://other.example:1"],
    ));
    assert!(stdout.contains("upgraded /usr/local/bin/fleetban-agent"), "{stdout}");
    assert_eq!(std::fs::read(root.join("usr/local/bin/fleetban-agent")).unwrap(), upgraded);
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), text, "the upgrade rewrote the config");
    assert_eq!(std::fs::read_to_string(&credentials).unwrap(), "{\"agent_id\": \"kept\"}");
    assert!(root.join("var/lib/fleetban/spool/00000001.seg").is_file());

    // --uninstall leaves the tree exactly as it was before the install.
    let stdout = ok(&install(&root, &["--uninstall"]));
    assert!(stdout.contains("uninstalled"), "{stdout}");
    assert_eq!(tree(&root), before, "--uninstall left something behind or removed too much");
}

#[test]
fn installer_detects_the_firewall_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = agent_bin();
    let bin_arg = bin.to_str().expect("utf-8");
    let args = ["--no-start", "--no-enroll", "--server", SERVER, "--binary", bin_arg];

    // Ubuntu with nftables and Debian's exim4 layout.
    let ubuntu = dir.path().join("ubuntu");
    write(&ubuntu, "etc/os-release", "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"24.04\"\n");
    write(&ubuntu, "usr/sbin/nft", "#!/bin/sh\nexit 0\n");
    std::fs::set_permissions(ubuntu.join("usr/sbin/nft"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(ubuntu.join("var/log/exim4")).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let stdout = ok(&install(&ubuntu, &[&args[..], &["--ca-file", ca.to_str().unwrap()]].concat()));
    assert!(stdout.contains("OS: ubuntu 24.04"), "{stdout}");
    assert_eq!(mode(&ubuntu, "etc/fleetban/ca.pem"), 0o644);
    let config = AgentConfig::load(&ubuntu.join("etc/fleetban/agent.toml")).unwrap();
    assert_eq!(config.ca_file.as_deref(), Some(Path::new("/etc/fleetban/ca.pem")));
    assert_eq!(config.firewall.backend, FirewallBackend::Nftables);
    assert_eq!(config.sources[0].path, Path::new("/var/log/exim4/mainlog"));
    assert_eq!(config.detect.smtp_accept_max, 0, "no exim.conf: learn it");

    // An explicit backend wins over detection.
    let ipset = dir.path().join("ipset");
    write(&ipset, "etc/os-release", "ID=rocky\nVERSION_ID=\"8.10\"\n");
    ok(&install(&ipset, &[&args[..], &["--backend", "ipset"]].concat()));
    let config = AgentConfig::load(&ipset.join("etc/fleetban/agent.toml")).unwrap();
    assert_eq!(config.firewall.backend, FirewallBackend::Ipset);

    // No firewall at all: refused before anything is written.
    let bare = dir.path().join("bare");
    write(&bare, "etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n");
    let before = tree(&bare);
    let output = install(&bare, &args);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--backend dry-run"));
    assert_eq!(tree(&bare), before, "a refused install wrote files");

    // --root acts on a staging tree: enrolling or starting is refused.
    let output = install(&bare, &["--server", SERVER, "--binary", bin_arg, "--backend", "dry-run"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--no-start and --no-enroll"));
    // Bad flags are named.
    let output = install(&bare, &["--backend", "pf", "--no-start", "--no-enroll"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--backend must be"));
    // A bad server URL never lands in a config.
    let output = install(
        &bare,
        &["--no-start", "--no-enroll", "--backend", "dry-run", "--binary", bin_arg, "--server", "ftp://x"],
    );
    assert!(!output.status.success());
    assert!(!bare.join("etc/fleetban/agent.toml").exists());
}

fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines().filter_map(|line| line.strip_prefix(key)?.strip_prefix('=')).map(str::to_owned).collect()
}

#[test]
fn systemd_units_are_notify_services_with_hardening() {
    let agent = read("deploy/systemd/fleetban-agent.service");
    let server = read("deploy/systemd/fleetban-server.service");
    for unit in [&agent, &server] {
        assert_eq!(unit_values(unit, "Type"), ["notify"]);
        assert_eq!(unit_values(unit, "Restart"), ["on-failure"]);
        assert_eq!(unit_values(unit, "NoNewPrivileges"), ["yes"]);
        assert_eq!(unit_values(unit, "ProtectSystem"), ["strict"]);
        assert_eq!(unit_values(unit, "StandardError"), ["journal"]);
        assert_eq!(unit_values(unit, "WantedBy"), ["multi-user.target"]);
    }
    assert_eq!(unit_values(&agent, "CapabilityBoundingSet"), ["CAP_NET_ADMIN CAP_NET_RAW CAP_DAC_READ_SEARCH"]);
    assert_eq!(unit_values(&agent, "AmbientCapabilities"), ["CAP_NET_ADMIN CAP_NET_RAW CAP_DAC_READ_SEARCH"]);
    // The agent may write its state directory (the default one).
    let state_dir = AgentConfig::from_toml("server = \"https://a.example:1\"\n", Path::new("x")).unwrap().state_dir;
    let writable = unit_values(&agent, "ReadWritePaths").join(" ");
    assert!(writable.split(' ').any(|path| Path::new(path) == state_dir), "{writable}");
    assert_eq!(unit_values(&agent, "ExecStart"), ["/usr/bin/fleetban-agent run --config /etc/fleetban/agent.toml"]);
    assert_eq!(unit_values(&server, "User"), ["fleetban"]);
    assert_eq!(unit_values(&server, "CapabilityBoundingSet"), [""]);
    assert_eq!(
        unit_values(&server, "ExecStart"),
        ["/usr/bin/fleetban-server serve --config /etc/fleetban/server.toml"]
    );
}

/// The `source` paths of `[package.metadata.<tool>]` assets in a crate's
/// Cargo.toml: every file they name (other than build output) exists, and
/// the config files they install are valid.
#[test]
fn package_metadata_names_existing_files() {
    for krate in ["agent", "server"] {
        let manifest: toml::Value = toml::from_str(&read(&format!("{krate}/Cargo.toml"))).expect("Cargo.toml parses");
        let metadata = &manifest["package"]["metadata"];
        let deb = metadata["deb"]["assets"].as_array().expect("deb assets");
        for asset in deb {
            let source = asset[0].as_str().expect("source");
            if !source.starts_with("target/") {
                assert!(repo(&format!("{krate}/{source}")).is_file(), "{krate}: deb asset {source} missing");
            }
        }
        let scripts = metadata["deb"]["maintainer-scripts"].as_str().expect("maintainer-scripts");
        assert!(repo(&format!("{krate}/{scripts}postinst")).is_file(), "{krate}: no postinst");
        let rpm = &metadata["generate-rpm"];
        for asset in rpm["assets"].as_array().expect("rpm assets") {
            if let Some(source) = asset.get("source").and_then(|s| s.as_str())
                && !source.starts_with("target/")
            {
                assert!(repo(source).is_file(), "{krate}: rpm asset {source} missing");
            }
        }
        // cargo-generate-rpm takes a script path that does not exist as the
        // script's text: every one must exist.
        for key in ["pre_install_script", "post_install_script", "pre_uninstall_script"] {
            if let Some(path) = rpm.get(key).and_then(|s| s.as_str()) {
                assert!(repo(path).is_file(), "{krate}: {key} {path} missing");
            }
        }
    }
    // The CLI's own package (`--variant cli` of the server crate): only
    // /usr/bin/fleetban, no scripts, no configuration, none of the server's
    // dependencies; the server package recommends it instead of shipping it.
    let manifest: toml::Value = toml::from_str(&read("server/Cargo.toml")).expect("Cargo.toml parses");
    let metadata = &manifest["package"]["metadata"];
    let deb = &metadata["deb"]["variants"]["cli"];
    assert_eq!(deb["name"].as_str(), Some("fleetban-cli"));
    let assets = deb["assets"].as_array().expect("deb cli assets");
    assert_eq!(assets.len(), 1, "{assets:?}");
    assert_eq!((assets[0][0].as_str(), assets[0][1].as_str()), (Some("target/release/fleetban"), Some("usr/bin/")));
    assert_eq!(deb["conf-files"].as_array().map(Vec::len), Some(0), "deb cli: conf-files must be empty");
    let scripts = deb["maintainer-scripts"].as_str().expect("deb cli maintainer-scripts");
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        assert!(!repo(&format!("server/{scripts}{script}")).exists(), "deb cli: has a {script}");
    }
    assert!(repo(&format!("server/{scripts}")).is_dir(), "deb cli: {scripts} missing");
    let server_deb = &metadata["deb"];
    assert!(server_deb["recommends"].as_str().is_some_and(|r| r.contains("fleetban-cli")));
    // Deb assets are arrays `[source, dest, mode]`, RPM assets tables.
    let ships_cli =
        |assets: &toml::Value| {
            assets.as_array().expect("assets").iter().any(|a| {
                a.get(0).or_else(|| a.get("source")).and_then(|s| s.as_str()) == Some("target/release/fleetban")
            })
        };
    assert!(!ships_cli(&server_deb["assets"]), "the server deb still ships the CLI");
    let rpm = &metadata["generate-rpm"]["variants"]["cli"];
    assert_eq!(rpm["name"].as_str(), Some("fleetban-cli"));
    let assets = rpm["assets"].as_array().expect("rpm cli assets");
    assert_eq!(assets.len(), 1, "{assets:?}");
    assert_eq!(assets[0]["dest"].as_str(), Some("/usr/bin/fleetban"));
    // A variant inherits the keys it does not set: the server's scripts and
    // requirements must be overridden.
    for key in ["pre_install_script", "post_install_script", "pre_uninstall_script"] {
        assert_eq!(rpm[key].as_str(), Some("exit 0"), "rpm cli: {key}");
    }
    assert_eq!(rpm["requires"].as_table().map(toml::map::Map::len), Some(0), "rpm cli: requires");
    assert!(!ships_cli(&metadata["generate-rpm"]["assets"]), "the server rpm still ships the CLI");
    assert!(metadata["generate-rpm"]["recommends"].get("fleetban-cli").is_some());

    let packaged = AgentConfig::load(&repo("deploy/packaging/agent.toml")).expect("packaged agent.toml loads");
    assert!(fleetban_agent::check::check(&packaged, false).is_empty(), "packaged agent.toml has findings");
    fleetban_server::config::ServerConfig::parse(&read("deploy/server.example.toml")).expect("server.example.toml");
}

fn yaml(path: &str) -> serde_json::Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(text) => vec![text.clone()],
        serde_json::Value::Array(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// Structure only: CI has no Docker engine, so the stack is never started.
#[test]
fn compose_stack_is_postgres_and_the_server_with_tls_and_healthchecks() {
    let compose = yaml("deploy/compose/compose.yaml");
    let services = compose["services"].as_object().expect("services");
    assert_eq!(services.keys().collect::<Vec<_>>(), ["postgres", "server"]);
    let postgres = &services["postgres"];
    assert!(strings(&postgres["healthcheck"]["test"]).join(" ").contains("pg_isready"));
    assert!(strings(&postgres["volumes"]).iter().any(|v| v.ends_with(":/var/lib/postgresql/data")));

    let server = &services["server"];
    assert_eq!(server["depends_on"]["postgres"]["condition"], "service_healthy");
    let health = strings(&server["healthcheck"]["test"]).join(" ");
    assert!(health.contains("/readyz"), "{health}");
    let volumes = strings(&server["volumes"]);
    assert!(volumes.iter().any(|v| v.ends_with(":/etc/fleetban/tls:ro")), "TLS material not mounted: {volumes:?}");
    let config_mount = volumes
        .iter()
        .find_map(|v| v.strip_suffix(":/etc/fleetban/server.toml:ro"))
        .expect("server.toml mounted read-only");
    assert!(server["environment"]["DATABASE_URL"].as_str().expect("DATABASE_URL").contains("@postgres:5432/"));

    // The mounted config serves TLS from the mounted directory, on the ports
    // compose publishes and the health check asks.
    let config_path = format!("deploy/compose/{}", config_mount.trim_start_matches("./"));
    let config = fleetban_server::config::ServerConfig::parse(&read(&config_path)).expect("compose server.toml");
    let tls = config.tls.expect("TLS configured");
    assert!(tls.cert_file.starts_with("/etc/fleetban/tls") && tls.key_file.starts_with("/etc/fleetban/tls"));
    let ports = strings(&server["ports"]);
    assert!(ports.iter().any(|p| p.ends_with(&format!(":{}", config.grpc_listen.port()))), "{ports:?}");
    assert!(ports.contains(&format!("127.0.0.1:{0}:{0}", config.http_listen.port())), "{ports:?}");
    assert!(health.contains(&format!("127.0.0.1:{}/readyz", config.http_listen.port())), "{health}");

    // The image: multi-stage, runs as the non-root user compose names.
    let dockerfile_path = server["build"]["dockerfile"].as_str().expect("dockerfile");
    let dockerfile = read(dockerfile_path);
    let from = dockerfile.lines().filter(|line| line.starts_with("FROM ")).count();
    assert!(from >= 2, "not a multi-stage build");
    let user = dockerfile.lines().rev().find_map(|line| line.strip_prefix("USER ")).expect("USER in the final stage");
    assert!(!user.starts_with("root") && !user.starts_with("0:") && user != "0", "runs as root: {user}");
    assert_eq!(server["user"].as_str(), Some(user), "compose and the image disagree on the user");
    let uid = user.split(':').next().unwrap();
    assert!(dockerfile.contains(&format!("--uid {uid}")), "user {uid} is not created in the image");
    assert!(dockerfile.contains("COPY --from=build") && dockerfile.contains("ENTRYPOINT [\"fleetban-server\"]"));
    assert!(dockerfile.contains("/readyz"), "no image health check");
    let ignore = read(&format!("{dockerfile_path}.dockerignore"));
    assert!(ignore.lines().any(|line| line == "target/"), "the build context would include target/");
}
