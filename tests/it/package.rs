//! Operations: `check-config` and `run` refuse the same broken configurations with exit 78,
//! naming the problem; configuration errors reach journald as priority 3; and the Debian package
//! (cargo-deb) has the right contents, installs into a throwaway root with its maintainer
//! scripts (`dpkg --root --force-script-chrootless`, which runs systemd-sysusers/-tmpfiles with
//! `--root`), and its installed binary passes `check-config` on the installed example config.
//! Needs: cargo-deb (`cargo install cargo-deb`; `.ci/run` installs it), dpkg, systemd-sysusers,
//! systemd-tmpfiles, readelf, and root for the dpkg install.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_refex");

fn federation(dir: &Path) -> PathBuf {
    let out = Command::new(BIN)
        .args(["federation", "init", "--dir"])
        .arg(dir)
        .args(["--areas", "west-midlands,london", "--base-port", "18301"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    dir.join("west-midlands/refex.toml")
}

fn refex(cmd: &str, config: &Path) -> Output {
    Command::new(BIN)
        .arg(cmd)
        .arg("--config")
        .arg(config)
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap()
}

/// Both `check-config` and `run` exit 78 and name every expected fragment on stderr.
fn both_refuse(config: &Path, expected: &[&str]) {
    for cmd in ["check-config", "run"] {
        let out = refex(cmd, config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{cmd}: {err}");
        for e in expected {
            assert!(err.contains(e), "{cmd}: expected '{e}' in:\n{err}");
        }
        assert!(!String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    }
}

fn edit(config: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from}");
    fs::write(config, text.replace(from, to)).unwrap();
}

#[test]
fn a_fresh_development_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    let out = refex("check-config", &config);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn a_signing_key_readable_by_others_is_refused_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    let key = dir.path().join("west-midlands/keys/signing.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    both_refuse(&config, &["keys.signing_key", "mode 0644"]);
}

#[test]
fn an_outbox_whose_parent_does_not_exist_is_refused_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    edit(
        &config,
        "outbox = \"outbox\"",
        "outbox = \"no-such-dir/outbox\"",
    );
    both_refuse(&config, &["paths.outbox", "nor does its parent"]);
}

#[test]
fn another_areas_certificate_and_key_are_refused_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    edit(
        &config,
        "tls_cert = \"keys/tls.pem\"",
        "tls_cert = \"../london/keys/tls.pem\"",
    );
    edit(
        &config,
        "tls_key = \"keys/tls.key\"",
        "tls_key = \"../london/keys/tls.key\"",
    );
    both_refuse(
        &config,
        &[
            "keys.tls_cert",
            "urn:refex:area:london",
            "urn:refex:area:west-midlands",
        ],
    );
}

#[test]
fn under_journald_configuration_errors_carry_priority_3() {
    let dir = tempfile::tempdir().unwrap();
    let config = federation(dir.path());
    let key = dir.path().join("west-midlands/keys/signing.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    // journald hands the service a stream and names it in JOURNAL_STREAM as dev:inode.
    let log = dir.path().join("stderr.log");
    let file = fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let status = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(78));
    let text = fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with("<3>"), "{line:?} in\n{text}");
    }
    assert!(text.contains("keys.signing_key"), "{text}");
    assert!(!text.contains('\x1b'), "{text}");
    // Not the journal (a plain pipe): no prefixes.
    let out = refex("check-config", &config);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("<3>"));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn group_line(root: &Path, name: &str) -> Vec<String> {
    let text = fs::read_to_string(root.join("etc/group")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("group {name} missing:\n{text}"));
    line.split(':').map(str::to_owned).collect()
}

fn mode_and_gid(p: &Path) -> (u32, u32) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.gid())
}

#[test]
fn the_debian_package_installs_into_a_throwaway_root_and_its_example_config_checks() {
    if Command::new("cargo-deb").arg("--version").output().is_err() {
        panic!("cargo-deb is not installed: run `cargo install cargo-deb` (.ci/run does this)");
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "this test installs the package with `dpkg --root` and runs systemd-sysusers/-tmpfiles \
         there, which set owners: run it as root (CI does)"
    );
    let bin = Path::new(BIN);
    let target = bin.parent().and_then(Path::parent).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("deb");
    fs::create_dir(&out_dir).unwrap();
    run(Command::new("cargo-deb")
        .args(["--no-build", "--dbgsym", "--output"])
        .arg(&out_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target));
    let mut deb = None;
    let mut ddeb = None;
    for e in fs::read_dir(&out_dir).unwrap() {
        let p = e.unwrap().path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("deb") => deb = Some(p),
            Some("ddeb") => ddeb = Some(p),
            _ => {}
        }
    }
    let deb = deb.expect("no .deb made");
    let ddeb = ddeb.expect("no -dbgsym .ddeb made");

    // Contents and modes.
    let list = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/refex"),
        ("-rw-r--r--", "./usr/lib/systemd/system/refex.service"),
        ("-rw-r--r--", "./usr/lib/sysusers.d/refex.conf"),
        ("-rw-r--r--", "./usr/lib/tmpfiles.d/refex.conf"),
        ("-rw-r--r--", "./etc/refex/refex.toml"),
        ("-rw-r--r--", "./usr/share/doc/refex/README.md"),
        ("-rw-r--r--", "./usr/share/refex/bank-holidays.toml"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.contains(" 0/0 ") && l.ends_with(path)),
            "{mode} 0/0 {path} not in:\n{list}"
        );
    }
    assert!(!list.contains("usr/lib/debug"), "{list}");
    let dbg = run(Command::new("dpkg-deb").arg("-c").arg(&ddeb));
    assert!(
        dbg.lines()
            .any(|l| l.contains("./usr/lib/debug/.build-id/") && l.ends_with(".debug")),
        "{dbg}"
    );
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/refex/refex.toml");
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg(script));
    }

    // Install with the maintainer scripts, chrootless (they honour DPKG_ROOT).
    let root = tmp.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "--no-triggers",
            "-i",
        ])
        .arg(&deb));
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Status: install ok installed"), "{status}");

    // sysusers.d ran: the user and the two groups, refex a member of refex-providers.
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("refex:")), "{passwd}");
    let operators = group_line(&root, "refex-operators");
    let providers = group_line(&root, "refex-providers");
    assert_eq!(providers[3], "refex");
    let providers_gid: u32 = providers[2].parse().unwrap();
    let operators_gid: u32 = operators[2].parse().unwrap();
    // tmpfiles.d ran: modes and groups.
    assert_eq!(
        mode_and_gid(&root.join("var/spool/refex/outbox")),
        (0o2770, providers_gid)
    );
    assert_eq!(
        mode_and_gid(&root.join("var/spool/refex/inbox")),
        (0o2770, providers_gid)
    );
    assert_eq!(
        mode_and_gid(&root.join("run/refex")),
        (0o2750, operators_gid)
    );
    assert_eq!(mode_and_gid(&root.join("var/lib/refex/state")).0, 0o750);
    assert_eq!(mode_and_gid(&root.join("var/log/refex/audit")).0, 0o750);
    assert_eq!(mode_and_gid(&root.join("etc/refex/keys")).0, 0o700);

    // The installed binary is stripped; the symbols are in the .ddeb.
    let installed = root.join("usr/bin/refex");
    let sections = run(Command::new("readelf").arg("-S").arg(&installed));
    assert!(!sections.contains(".debug_info"), "not stripped");
    let (full, stripped, deb_size) = (
        fs::metadata(bin).unwrap().len(),
        fs::metadata(&installed).unwrap().len(),
        fs::metadata(&deb).unwrap().len(),
    );
    eprintln!(
        "package: {} bytes; stripped binary {stripped} bytes vs {full} bytes with debug info; dbgsym {} bytes",
        deb_size,
        fs::metadata(&ddeb).unwrap().len()
    );

    // The installed example config, adapted to the throwaway root, with a dev node's material.
    let fed = tmp.path().join("fed");
    federation(&fed);
    let etc = root.join("etc/refex");
    fs::copy(fed.join("ca/ca.pem"), etc.join("ca.pem")).unwrap();
    fs::copy(fed.join("directory.toml"), etc.join("directory.toml")).unwrap();
    fs::copy(fed.join("postcodes.toml"), etc.join("postcodes.toml")).unwrap();
    for k in [
        "tls.pem",
        "tls.key",
        "signing.key",
        "encryption.key",
        "subject.key",
    ] {
        fs::copy(
            fed.join("west-midlands/keys").join(k),
            etc.join("keys").join(k),
        )
        .unwrap();
    }
    let config = etc.join("refex.toml");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("area = \"west-midlands\""));
    fs::write(
        &config,
        text.replace("\"/", &format!("\"{}/", root.display())),
    )
    .unwrap();
    let out = Command::new(&installed)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installed check-config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    // ...and the installed binary refuses the same config once a key is world-readable.
    fs::set_permissions(
        etc.join("keys/signing.key"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(&installed)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));

    // The unit as installed keeps its hardening (systemd-analyze, when present).
    if let Ok(out) = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(root.join("usr/lib/systemd/system/refex.service"))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("exposure level for refex.service: ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
        eprintln!("systemd-analyze security exposure: {score}");
        assert!(score <= 1.2, "exposure {score} > 1.2");
    }
}
