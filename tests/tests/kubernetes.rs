//! `packaging/kubernetes/` (issue 14.6): the manifests validate (strictly) against the
//! Kubernetes schema, the policies and config their ConfigMaps carry pass agentseg's own
//! checks, the DaemonSet asks for the unit's capabilities and nothing more, and the
//! Containerfile starts the packaged binary on the config the DaemonSet mounts.
use std::{path::Path, process::Command};

use agentseg_tests::{agentseg_bin, kernel_ready, run_ok, unit_capabilities};

fn packaging() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// Run python3 with the validator's packages (PyYAML among them) on `script`.
fn python(tools: &Path, script: &str, args: &[&str]) -> String {
    run_ok(
        Command::new("python3")
            .env("PYTHONPATH", tools)
            .arg("-c")
            .arg(script)
            .args(args),
    )
}

#[test]
fn the_manifests_validate_and_agree_with_the_unit_and_the_package() {
    if std::env::var_os("AGENTSEG_BIN").is_none() && !kernel_ready() {
        return;
    }
    let Some(tools) = std::env::var_os("AGENTSEG_K8S_VALIDATE") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "AGENTSEG_K8S_VALIDATE unset under CI: `cargo xtask test` installs the validator"
        );
        eprintln!("SKIPPED: AGENTSEG_K8S_VALIDATE unset");
        return;
    };
    let tools = Path::new(&tools);
    let manifest = packaging().join("kubernetes/agentseg.yaml");
    let out = Command::new("python3")
        .env("PYTHONPATH", tools)
        .arg(tools.join("bin/kubernetes-validate"))
        .args(["--strict", "-k", "1.31"])
        .arg(&manifest)
        .output()
        .expect("kubernetes-validate");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("passed for resource").count(), 4, "{said}");
    // The ConfigMaps' files, written out.
    let dir = tempfile::tempdir().expect("tempdir");
    let extract = r#"
import os, sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
out = sys.argv[2]
for d in docs:
    if d["kind"] == "ConfigMap":
        sub = os.path.join(out, d["metadata"]["name"])
        os.makedirs(sub)
        for name, text in d["data"].items():
            open(os.path.join(sub, name), "w").write(text)
    if d["kind"] == "DaemonSet":
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        print("hostPID", spec["hostPID"])
        print("caps", " ".join(sorted(c["securityContext"]["capabilities"]["add"])))
        print("drop", " ".join(c["securityContext"]["capabilities"]["drop"]))
        print("args", " ".join(c["args"]))
        for m in c["volumeMounts"]:
            print("mount", m["mountPath"])
        for v in spec["volumes"]:
            if "hostPath" in v:
                print("host", v["hostPath"]["path"])
"#;
    let facts = python(
        tools,
        extract,
        &[
            manifest.to_str().expect("utf8"),
            dir.path().to_str().expect("utf8"),
        ],
    );
    let fact = |key: &str| -> Vec<String> {
        facts
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key} ")))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(fact("hostPID"), ["True"]);
    assert_eq!(fact("drop"), ["ALL"]);
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/var/lib/agentseg",
        "/var/log/agentseg",
        "/run/agentseg",
    ] {
        assert!(
            fact("host").iter().any(|h| h == path),
            "no hostPath {path}: {facts}"
        );
    }
    // The capabilities the unit bounds the daemon to, no more, no fewer.
    let mut unit_caps: Vec<String> = unit_capabilities()
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    unit_caps.sort();
    assert_eq!(fact("caps"), [unit_caps.join(" ")]);
    // The policies pass `agentseg check`, read with the config the DaemonSet mounts.
    let config = dir.path().join("agentseg-config/agentseg.toml");
    let policies = dir.path().join("agentseg-policies");
    let out = Command::new(agentseg_bin())
        .env("AGENTSEG_CONFIG", &config)
        .arg("check")
        .arg(&policies)
        .output()
        .expect("agentseg check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("default daemon settings"),
        "the config does not parse: {stderr}"
    );
    // The image runs the packaged binary on the config the DaemonSet mounts.
    let containerfile = std::fs::read_to_string(packaging().join("kubernetes/Containerfile"))
        .expect("Containerfile");
    assert!(
        containerfile.contains("ENTRYPOINT [\"/usr/bin/agentseg\"]"),
        "{containerfile}"
    );
    assert_eq!(
        fact("args"),
        ["daemon --config /etc/agentseg/agentseg.toml"]
    );
    assert!(
        fact("mount")
            .iter()
            .any(|m| m == "/etc/agentseg/agentseg.toml")
    );
    assert!(fact("mount").iter().any(|m| m == "/etc/agentseg/policies"));
}
