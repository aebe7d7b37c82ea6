//! The definition rules, one test per rule: valid input gives the right
//! values, and each mistake is reported where it is, with a useful message.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::*;

/// Writes `toml` as a test definition in a fresh directory and loads it.
fn load(toml: &str) -> (tempfile::TempDir, Result<TestSpec, SpecError>) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(DEFINITION_FILE), toml).unwrap();
    fs::write(dir.path().join("main.py"), "print('hi')\n").unwrap();
    let spec = TestSpec::load(dir.path());
    (dir, spec)
}

fn errors(toml: &str) -> Vec<Diagnostic> {
    match load(toml).1 {
        Err(SpecError::Invalid(Diagnostics(all))) => all,
        other => panic!("expected diagnostics, got {other:?}"),
    }
}

/// The one diagnostic `toml` gives, as (line, column, message, help).
fn error(toml: &str) -> (usize, usize, String, Option<String>) {
    let all = errors(toml);
    assert_eq!(all.len(), 1, "expected one error, got: {all:#?}");
    let d = &all[0];
    (d.line, d.column, d.message.clone(), d.help.clone())
}

const SCRIPT: &str = "\n[test]\nscript = \"machine.succeed('true')\"\n";

fn with_script(nodes: &str) -> String {
    format!("{nodes}{SCRIPT}")
}

#[test]
fn reads_the_reference_example() {
    let spec = TestSpec::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nix-is-cool"))).unwrap();
    assert_eq!(spec.name, "api-test");
    assert_eq!(spec.distro, "bookworm");
    assert_eq!(spec.timeout, Duration::from_secs(3600));
    assert_eq!(spec.nodes.keys().collect::<Vec<_>>(), ["client", "server"]);
    let server = &spec.nodes["server"];
    assert_eq!(server.packages, ["python3-fastapi", "python3-uvicorn", "uvicorn"]);
    assert_eq!(server.firewall.allowed_tcp_ports, [4000]);
    assert!(server.firewall.enable);
    assert_eq!(server.vlans, [1]);
    let Service::Fields(app) = &server.services["app"] else { panic!("app is not a field service") };
    assert_eq!(app.exec_start, "uvicorn main:app");
    assert_eq!(app.working_directory.as_deref(), Some("/srv/api"));
    assert_eq!(app.environment["UVICORN_PORT"], "4000");
    assert_eq!(app.wanted_by, ["multi-user.target"]);
    let FileContent::Source { exclude, .. } = &server.files["/srv/api"].content else { panic!("not a source") };
    assert_eq!(exclude, &["vmrig.toml"]);
    assert!(spec.script.text.starts_with("server.wait_for_unit(\"default.target\")"));
    // The script's first line is the line after `script = '''`.
    let definition = fs::read_to_string(&spec.script.path).unwrap();
    let line = definition.lines().nth(spec.script.first_line - 1).unwrap();
    assert_eq!(line, "server.wait_for_unit(\"default.target\")");
}

#[test]
fn defaults_fill_in_what_nodes_leave_out() {
    let (_dir, spec) = load(&with_script(
        "[defaults]\nmemory = 1024\npackages = [\"curl\"]\n[nodes.a]\n[nodes.b]\nmemory = 256\n",
    ));
    let spec = spec.unwrap();
    assert_eq!(spec.nodes["a"].memory_mib, 1024);
    assert_eq!(spec.nodes["a"].packages, ["curl"]);
    assert_eq!(spec.nodes["b"].memory_mib, 256);
}

#[test]
fn a_display_is_asked_per_node_or_for_all_and_headless_is_the_default() {
    let (_dir, spec) = load(&with_script("[nodes.a]
graphics = true
[nodes.b]
"));
    let spec = spec.unwrap();
    assert!(spec.nodes["a"].graphics && !spec.nodes["b"].graphics);
    let (_dir, spec) = load(&with_script("[defaults]
graphics = true
[nodes.a]
[nodes.b]
graphics = false
"));
    let spec = spec.unwrap();
    assert!(spec.nodes["a"].graphics && !spec.nodes["b"].graphics);
    let (_, _, message, _) = error(&with_script("[nodes.a]
graphics = \"yes\"\n"));
    assert_eq!(message, "`graphics` must be true or false, found string");
}

#[test]
fn defaults_merge_into_a_nodes_own_tables_and_add_to_its_packages() {
    let (_dir, spec) = load(&with_script(
        r#"
[defaults]
packages = ["curl"]
files."/etc/common" = { text = "every node" }
firewall.allowed_tcp_ports = [22]
vlans = [1]
[nodes.a]
packages = ["nginx-light"]
files."/etc/own" = { text = "a alone" }
firewall.enable = false
vlans = [2]
[nodes.b]
files."/etc/common" = { text = "b's own" }
"#,
    ));
    let spec = spec.unwrap();
    let (a, b) = (&spec.nodes["a"], &spec.nodes["b"]);
    assert_eq!(a.packages, ["curl", "nginx-light"]);
    assert_eq!(a.files.keys().collect::<Vec<_>>(), ["/etc/common", "/etc/own"]);
    assert!(!a.firewall.enable);
    assert_eq!(a.firewall.allowed_tcp_ports, [22]);
    assert_eq!(a.vlans, [2]);
    assert_eq!(b.packages, ["curl"]);
    assert_eq!(b.files["/etc/common"].content, FileContent::Text("b's own".into()));
}

#[test]
fn reads_every_node_field() {
    let (dir, spec) = load(&with_script(
        r#"
name = "all"
distro = "trixie"
mirror = "http://archive.example/debian/"
timeout = 60
[nodes.web-1]
cpus = 2
vlans = [1, 2]
kernel_params = ["quiet"]
extra_hosts = { "10.0.0.1" = ["gateway", "gw"] }
files."/etc/motd" = { text = "hello", mode = "0600" }
files."/srv/app" = { source = "main.py", mode = 0o755 }
users.alice = { groups = ["wheel"], shell = "/bin/bash" }
firewall = { enable = false, allowed_udp_ports = [53] }
[nodes.web-1.services.raw]
unit = "[Service]\nExecStart=/bin/true\n"
wanted_by = ["multi-user.target"]
[nodes.web-1.units."nightly.timer"]
unit = "[Timer]\nOnCalendar=daily\n"
wanted_by = ["timers.target"]
[nodes.web-1.drop_ins]
"nginx.service" = "[Service]\nRestart=always\n"
[nodes.web-1.services.job]
exec_start = "/bin/true"
exec_start_pre = "/bin/echo pre"
exec_start_post = ["/bin/echo post", "/bin/echo ready"]
type = "oneshot"
restart = "on-failure"
user = "alice"
after = ["network.target"]
"#,
    ));
    let spec = spec.unwrap();
    assert_eq!(spec.name, "all");
    assert_eq!(spec.distro, "trixie");
    assert_eq!(spec.mirror.as_deref(), Some("http://archive.example/debian"));
    assert_eq!(spec.timeout, Duration::from_secs(60));
    let node = &spec.nodes["web-1"];
    assert_eq!(node.python_name(), "web_1");
    assert_eq!((node.cpus, node.vlans.as_slice()), (2, [1, 2].as_slice()));
    assert_eq!(node.extra_hosts["10.0.0.1"], ["gateway", "gw"]);
    assert_eq!(node.files["/etc/motd"], FileSpec { content: FileContent::Text("hello".into()), mode: Some(0o600) });
    assert_eq!(
        node.files["/srv/app"],
        FileSpec {
            content: FileContent::Source { path: dir.path().join("main.py"), exclude: vec![] },
            mode: Some(0o755)
        }
    );
    assert_eq!(node.users["alice"].groups, ["wheel"]);
    assert!(!node.firewall.enable);
    assert_eq!(node.firewall.allowed_udp_ports, [53]);
    assert!(matches!(&node.services["raw"], Service::Raw(raw) if raw.text.contains("ExecStart=/bin/true") && raw.wanted_by == ["multi-user.target"]));
    assert_eq!(node.units["nightly.timer"].wanted_by, ["timers.target"]);
    assert_eq!(node.drop_ins["nginx.service"], "[Service]\nRestart=always\n");
    let Service::Fields(job) = &node.services["job"] else { panic!() };
    assert_eq!(job.exec_start_pre, ["/bin/echo pre"]);
    assert_eq!(job.exec_start_post, ["/bin/echo post", "/bin/echo ready"]);
    assert_eq!(job.service_type.as_deref(), Some("oneshot"));
}

#[test]
fn misspelt_keys_name_the_nearest() {
    let (line, column, message, help) = error(&with_script("[nodes.a]\npakages = [\"curl\"]\n"));
    assert_eq!((line, column), (2, 1));
    assert_eq!(message, "unknown key `pakages` in node `a`");
    assert_eq!(help.as_deref(), Some("did you mean `packages`?"));

    let (_, _, message, help) = error(&with_script("[nodes.a.services.x]\nexec_strat = \"/bin/true\"\nexec_start = \"/bin/true\"\n"));
    assert_eq!(message, "unknown key `exec_strat` in service `x`");
    assert_eq!(help.as_deref(), Some("did you mean `exec_start`?"));

    let (_, _, message, help) = error(&with_script("naem = \"x\"\n[nodes.a]\n"));
    assert_eq!(message, "unknown key `naem` in the test definition");
    assert_eq!(help.as_deref(), Some("did you mean `name`?"));

    let (_, _, _, help) = error(&with_script("[nodes.a]\nzzzzzz = 1\n"));
    assert!(help.unwrap().starts_with("expected one of `packages`"));
}

#[test]
fn misspelt_choices_name_the_nearest() {
    let (_, _, message, help) = error(&with_script("[nodes.a.services.x]\nexec_start = \"/bin/true\"\ntype = \"oneshoot\"\n"));
    assert_eq!(message, "`oneshoot` is not a valid `type`");
    assert_eq!(help.as_deref(), Some("did you mean `oneshot`?"));
}

#[test]
fn a_test_needs_nodes_and_a_script() {
    let (_, _, message, _) = error(SCRIPT);
    assert!(message.starts_with("the test declares no nodes"), "{message}");
    let (_, _, message, _) = error("[nodes.a]\n");
    assert!(message.starts_with("the test has no script"), "{message}");
    let (_, _, message, _) = error("[nodes.a]\n[test]\nscript = \"x\"\nscript_file = \"main.py\"\n");
    assert!(message.contains("both `script` and `script_file`"), "{message}");
    let (line, _, message, _) = error("[nodes.a]\n[test]\nscript_file = \"missing.py\"\n");
    assert_eq!(line, 3);
    assert!(message.starts_with("cannot read script `missing.py`"), "{message}");
}

#[test]
fn a_missing_source_is_located() {
    let (line, column, message, _) = error(&with_script("[nodes.a]\nfiles.\"/srv\" = { source = \"nope\" }\n"));
    assert_eq!((line, column), (2, 27));
    assert!(message.starts_with("`source` `nope` does not exist"), "{message}");
}

#[test]
fn ports_must_be_in_range() {
    let (line, column, message, _) = error(&with_script("[nodes.a]\nfirewall.allowed_tcp_ports = [80, 70000]\n"));
    assert_eq!((line, column), (2, 35));
    assert_eq!(message, "a port must be between 1 and 65535");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nfirewall.allowed_tcp_ports = [0]\n"));
    assert_eq!(message, "a port must be between 1 and 65535");
}

#[test]
fn services_need_a_command_or_a_unit() {
    let (line, column, message, _) = error(&with_script("[nodes.a.services.app]\nuser = \"x\"\n"));
    assert_eq!((line, column), (1, 19));
    assert_eq!(message, "service `app` needs `exec_start` (or a raw `unit`)");
    let (_, _, message, _) = error(&with_script("[nodes.a.services.app]\nunit = \"x\"\nuser = \"y\"\n"));
    assert!(message.contains("raw `unit`, so it takes only `wanted_by` besides"), "{message}");
    let (_, _, message, help) = error(&with_script("[nodes.a.services.\"app.service\"]\nexec_start = \"x\"\n"));
    assert_eq!(message, "service names are written without `.service`");
    assert_eq!(help.as_deref(), Some("write `app`"));
}

#[test]
fn types_are_checked() {
    let (_, _, message, _) = error(&with_script("[nodes.a]\nmemory = \"lots\"\n"));
    assert_eq!(message, "`memory` (MiB) must be an integer, found string");
    let (_, _, message, _) = error(&with_script("[nodes.a]\npackages = \"curl\"\n"));
    assert_eq!(message, "`packages` must be a list of Debian package names, found string");
    let (_, _, message, _) = error(&with_script("[nodes.a]\npackages = [\"Curl\"]\n"));
    assert_eq!(message, "`Curl` in node `a` is not a valid Debian package name");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nvlans = [1, 1]\n"));
    assert_eq!(message, "VLAN 1 is listed twice");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nfiles.\"etc/x\" = { text = \"\" }\n"));
    assert!(message.starts_with("guest path `etc/x` must be absolute"), "{message}");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nextra_hosts = { \"gw\" = [\"x\"] }\n"));
    assert!(message.starts_with("`gw` is not an IP address"), "{message}");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nfiles.\"/x\" = { text = \"\", mode = \"999\" }\n"));
    assert!(message.starts_with("`mode` must be permission bits"), "{message}");
    let (_, _, message, _) = error(&with_script("mirror = \"deb.example\"\n[nodes.a]\n"));
    assert!(message.starts_with("`mirror` must be an http://"), "{message}");
}

#[test]
fn node_names_are_hostnames() {
    let (_, _, message, _) = error(&with_script("[nodes.\"my node\"]\n"));
    assert!(message.starts_with("`my node` is not a valid node name"), "{message}");
    let (_, _, message, _) = error(&with_script("[nodes.\"2fast\"]\n"));
    assert!(message.starts_with("`2fast` is not a valid node name"), "{message}");
    let (_dir, spec) = load(&with_script("[nodes.local_router]\n[nodes.web-1]\n"));
    let spec = spec.unwrap();
    assert_eq!(spec.nodes["local_router"].python_name(), "local_router");
    assert_eq!(spec.nodes["web-1"].python_name(), "web_1");
    let (_, _, message, _) = error(&with_script("[nodes.web-1]\n[nodes.web_1]\n"));
    assert_eq!(message, "nodes `web-1` and `web_1` would both be `web_1` in the test script: rename one");
}

#[test]
fn node_names_leave_the_scripts_own_globals_alone() {
    for name in ["machines", "start_all", "Machine", "subtest", "t", "os"] {
        let (line, _, message, _) = error(&with_script(&format!("[nodes.{name}]\n")));
        assert_eq!(line, 1);
        assert_eq!(message, format!("node `{name}` would be `{name}` in the test script, which hides the script's own `{name}`: rename the node"));
    }
}

#[test]
fn a_path_is_a_file_or_a_folder_not_both() {
    let (line, _, message, _) = error(&with_script("[nodes.a]\nfiles.\"/etc/x\" = { text = \"\" }\nfiles.\"/etc/x/y\" = { text = \"\" }\n"));
    assert_eq!(line, 3);
    assert_eq!(message, "file `/etc/x/y` is inside `/etc/x`, which line 2 declares as a file: a path is a file or a folder, not both");
    // A folder copied from the host may hold another declared file.
    let (dir, spec) = load(&with_script("[nodes.a]\nfiles.\"/srv\" = { source = \"tree\" }\nfiles.\"/srv/extra\" = { text = \"\" }\n"));
    assert!(matches!(spec, Err(SpecError::Invalid(_))), "the fixture's tree is made below");
    std::fs::create_dir(dir.path().join("tree")).unwrap();
    assert!(TestSpec::load(dir.path()).is_ok());
}

#[test]
fn every_mistake_is_reported_at_once() {
    let all = errors(&with_script(
        "[nodes.a]\npakages = []\nmemory = 1\n[nodes.b]\nfirewall.allowed_tcp_ports = [0]\n",
    ));
    let lines: Vec<usize> = all.iter().map(|d| d.line).collect();
    assert_eq!(lines, [2, 3, 5]);
}

#[test]
fn toml_syntax_errors_are_located() {
    let (line, _, message, _) = error("[nodes.a]\npackages = [\"curl\"\n");
    assert_eq!(line, 2);
    assert!(message.starts_with("this is not valid TOML"), "{message}");
}

#[test]
fn a_directory_without_a_definition_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let error = TestSpec::load(dir.path()).unwrap_err();
    assert!(matches!(error, SpecError::Missing(_)));
    assert!(error.to_string().ends_with("has no vmrig.toml"));
}

#[test]
fn firewalls_take_port_ranges_protocols_and_pings() {
    let (_dir, spec) = load(&with_script(
        r#"
[nodes.a]
firewall.allowed_tcp_port_ranges = [{ from = 8000, to = 8010 }]
firewall.allowed_udp_port_ranges = [{ from = 5000, to = 5000 }]
firewall.allowed_protocols = ["vrrp", 47]
firewall.allow_ping = false
"#,
    ));
    let firewall = &spec.unwrap().nodes["a"].firewall;
    assert_eq!(firewall.allowed_tcp_port_ranges, [8000..=8010]);
    assert_eq!(firewall.allowed_udp_port_ranges, [5000..=5000]);
    assert_eq!(firewall.allowed_protocols, [112, 47]);
    assert!(!firewall.allow_ping);

    let (_, _, message, help) = error(&with_script("[nodes.a]\nfirewall.allowed_protocols = [\"vrpp\"]\n"));
    assert_eq!(message, "`vrpp` is not an IP protocol vmrig knows by name");
    assert_eq!(help.as_deref(), Some("did you mean `vrrp`?"));
    let (_, _, message, _) = error(&with_script("[nodes.a]\nfirewall.allowed_tcp_port_ranges = [{ from = 9, to = 8 }]\n"));
    assert_eq!(message, "the range 9 to 8 is empty: `from` must not exceed `to`");
    let (_, _, message, _) = error(&with_script("[nodes.a]\nfirewall.allowed_tcp_port_ranges = [{ from = 9 }]\n"));
    assert_eq!(message, "a port range needs `to`");
}

#[test]
fn units_are_named_with_their_type_and_services_stay_under_services() {
    let (_, _, message, help) = error(&with_script("[nodes.a.units.\"web.service\"]\nunit = \"\"\n"));
    assert_eq!((message.as_str(), help.as_deref()), ("services are declared under `services`", Some("write `services.web.unit`")));
    let (_, _, message, _) = error(&with_script("[nodes.a.units.nightly]\nunit = \"\"\n"));
    assert_eq!(message, "`nightly` is not a unit name");
    let (_, _, message, _) = error(&with_script("[nodes.a.units.\"x.timer\"]\nwanted_by = []\n"));
    assert_eq!(message, "unit `x.timer` needs `unit`, its text");
    let (_, _, message, _) = error(&with_script("[nodes.a.drop_ins]\nnginx = \"\"\n"));
    assert_eq!(message, "`nginx` is not a unit name");
    let (_, _, message, _) = error(&with_script("[nodes.a.services.s]\nunit = \"\"\nuser = \"x\"\n"));
    assert_eq!(message, "service `s` is given as a raw `unit`, so it takes only `wanted_by` besides");
}

#[test]
fn nics_are_eth1_onwards_unless_the_node_names_its_interfaces() {
    let (_dir, spec) = load(&with_script("[nodes.a]\nvlans = [3, 1]\n[nodes.b]\ninterfaces.wan = { vlan = 2 }\ninterfaces.lan = { vlan = 1 }\n"));
    let spec = spec.unwrap();
    assert_eq!((spec.nodes["a"].vlans.as_slice(), spec.nodes["a"].interface_names.as_slice()), ([3, 1].as_slice(), ["eth1", "eth2"].map(String::from).as_slice()));
    assert_eq!(spec.nodes["b"].vlans, [2, 1]);
    assert_eq!(spec.nodes["b"].interface_names, ["wan", "lan"]);
    let (_, _, message, _) = error(&with_script("[nodes.a]\nvlans = [1]\ninterfaces.lan = { vlan = 1 }\n"));
    assert_eq!(message, "node `a` gives both `vlans` and `interfaces`: keep one (an interface names its VLAN)");
    let (_, _, message, _) = error(&with_script("[nodes.a]\ninterfaces.lan = { vlan = 1 }\ninterfaces.lan2 = { vlan = 1 }\n"));
    assert_eq!(message, "VLAN 1 has two interfaces");
    let (_, _, message, _) = error(&with_script("[nodes.a]\ninterfaces.\"a-very-long-interface\" = { vlan = 1 }\n"));
    assert!(message.starts_with("`a-very-long-interface` is not a network interface name"), "{message}");
}
