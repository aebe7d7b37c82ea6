//! `vmrig check` as a user runs it: on the reference example, and on a copy
//! broken in the ways people break definitions.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nix-is-cool")
}

/// The line of `definition` that holds `text`, counted from 1.
fn line_of(definition: &str, text: &str) -> usize {
    definition.lines().position(|line| line.contains(text)).expect("the text is in the definition") + 1
}

fn vmrig_check(dir: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .arg("check")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap(), text)
}

#[test]
fn the_reference_example_is_valid() {
    let (code, output) = vmrig_check(&example());
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("api-test: the definition is valid (2 nodes)"), "{output}");
}

#[test]
fn a_broken_copy_gets_every_error_located() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(example().join("main.py"), dir.path().join("main.py")).unwrap();
    let definition = fs::read_to_string(example().join("vmrig.toml"))
        .unwrap()
        .replace("packages = [\"curl\"]", "pakages = [\"curl\"]")
        .replace("source = \".\"", "source = \"./app\"");
    fs::write(dir.path().join("vmrig.toml"), &definition).unwrap();
    let toml = dir.path().join("vmrig.toml");
    let (source, typo) = (line_of(&definition, "./app"), line_of(&definition, "pakages"));

    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    let expected = format!(
        "error: `source` `./app` does not exist (looked for {}/./app)\n --> {toml}:{source}:31\n  |\n{source} | files.\"/srv/api\" = {{ source = \"./app\", exclude = [\"vmrig.toml\"] }}\n  |                               ^^^^^^^\n\n\
         error: unknown key `pakages` in node `client`\n  --> {toml}:{typo}:1\n   |\n{typo} | pakages = [\"curl\"]\n   | ^^^^^^^\n   = help: did you mean `packages`?\n\n\
         2 errors in the test definition\n",
        dir.path().display(),
        toml = toml.display(),
    );
    assert_eq!(output, expected);
}

#[test]
fn an_unknown_node_in_the_script_names_the_nearest() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(example().join("main.py"), dir.path().join("main.py")).unwrap();
    let definition = fs::read_to_string(example().join("vmrig.toml"))
        .unwrap()
        .replace("client.wait_for_unit", "clinet.wait_for_unit");
    fs::write(dir.path().join("vmrig.toml"), &definition).unwrap();
    let line = line_of(&definition, "clinet");

    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    let expected = format!(
        "error: unknown node `clinet` in the test script\n  --> {}:{line}:1\n   |\n{line} | clinet.wait_for_unit(\"default.target\")\n   | ^^^^^^\n   = help: did you mean `client`?\n\n1 error in the test definition\n",
        dir.path().join("vmrig.toml").display()
    );
    assert_eq!(output, expected);
}

#[test]
fn a_script_syntax_error_points_into_the_definition() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("vmrig.toml"),
        "[nodes.a]\n\n[test]\nscript = '''\nmachine.succeed('true')\nif True\n    pass\n'''\n",
    )
    .unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("error: the test script is not valid Python: expected ':'"), "{output}");
    assert!(output.contains("vmrig.toml:6:"), "{output}");
}

/// `vmrig run` refuses what `vmrig check` finds in a script before it
/// builds or boots anything: the mistakes would only end the run later.
#[test]
fn run_refuses_a_script_with_a_misspelt_node_before_building_anything() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("vmrig.toml"),
        "[nodes.client]\npackages = [\"curl\"]\n\n[test]\nscript = '''\nstart_all()\nclinet.succeed('true')\nclient.wait_for_unitt('x')\n'''\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vmrig")).arg("run").arg(dir.path()).env("VMRIG_STORE", store.path()).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("error: unknown node `clinet` in the test script"), "{text}");
    assert!(text.contains("vmrig.toml:7:1"), "{text}");
    assert!(text.contains("did you mean `wait_for_unit`?"), "{text}");
    assert!(!dir.path().join("result").exists(), "{text}");
    let built: Vec<_> = ["bases", "images"].iter().filter_map(|kind| fs::read_dir(store.path().join(kind)).ok()).flatten().collect();
    assert!(built.is_empty(), "the refused run built {built:?}:\n{text}");
}

#[test]
fn a_missing_definition_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2);
    assert!(output.contains("has no vmrig.toml"), "{output}");
}

#[test]
fn a_broken_definition_still_gets_its_script_checked_down_to_machine_methods() {
    let dir = tempfile::tempdir().unwrap();
    let definition = "[nodes.server]\nfiles.\"/srv/app\" = { source = \"./missing\" }\n\n[nodes.client]\n\n[test]\nscript = '''\nclinet.succeed(\"true\")\nclient.wait_for_unti(\"app.service\")\nserver.log(server.name)\n'''\n";
    fs::write(dir.path().join("vmrig.toml"), definition).unwrap();
    let toml = dir.path().join("vmrig.toml");

    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    let expected = format!(
        "error: `source` `./missing` does not exist (looked for {dir}/./missing)\n --> {toml}:2:31\n  |\n2 | files.\"/srv/app\" = {{ source = \"./missing\" }}\n  |                               ^^^^^^^^^^^\n\n\
         error: unknown node `clinet` in the test script\n --> {toml}:8:1\n  |\n8 | clinet.succeed(\"true\")\n  | ^^^^^^\n  = help: did you mean `client`?\n\n\
         error: machine `client` has no method or attribute `wait_for_unti`\n --> {toml}:9:8\n  |\n9 | client.wait_for_unti(\"app.service\")\n  |        ^^^^^^^^^^^^^\n  = help: did you mean `wait_for_unit`?\n\n\
         3 errors in the test definition\n",
        dir = dir.path().display(),
        toml = toml.display(),
    );
    assert_eq!(output, expected);
}

#[test]
fn machines_reached_through_loops_and_annotations_are_linted_with_nixos_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let definition = r#"[nodes.one]
[nodes.two]

[test]
script = '''
def check(node: Machine) -> None:
    assert node.booted and node.connected, node.state_dir
    node.shared_dri
for m in machines:
    print(m.name, m.pid, m.out_dir, m.full_console_log, m.keep_machine_state)
    m.bootd
'''
"#;
    fs::write(dir.path().join("vmrig.toml"), definition).unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("machine `node` has no method or attribute `shared_dri`"), "{output}");
    assert!(output.contains("machine `m` has no method or attribute `bootd`"), "{output}");
    assert!(output.contains("did you mean `booted`?"), "{output}");
    assert_eq!(output.matches("error:").count(), 2, "{output}");
}

#[test]
fn every_global_of_the_nixos_driver_is_known_and_vlans_by_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let definition = r#"[nodes.one]
vlans = [1, 3]
[nodes.two]

[test]
script = '''
def check(node: BaseMachine) -> None:
    print(node.shared_dir)
assert machines_qemu == machines and machines_nspawn == [] and vlan1.nr == 1
print(vlan3, vlans, driver.vlans, test_script, run_tests, create_machine, t, os, log)
debug.breakpoint()
print(vlan2)
'''
"#;
    fs::write(dir.path().join("vmrig.toml"), definition).unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("uses `vlan2`, which nothing defines"), "{output}");
    assert_eq!(output.matches("error:").count(), 1, "{output}");
}

#[test]
fn a_file_inside_a_file_and_a_node_named_as_a_script_global_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let definition = "[nodes.machines]\nfiles.\"/etc/x\" = { text = \"a file\" }\nfiles.\"/etc/x/y\" = { text = \"inside it\" }\n\n[test]\nscript = \"machines[0].succeed('true')\"\n";
    fs::write(dir.path().join("vmrig.toml"), definition).unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("error: node `machines` would be `machines` in the test script, which hides the script's own `machines`: rename the node\n"), "{output}");
    assert!(output.contains("error: file `/etc/x/y` is inside `/etc/x`, which line 2 declares as a file: a path is a file or a folder, not both\n"), "{output}");
    assert!(output.contains("vmrig.toml:3:7\n"), "{output}");
}

#[test]
fn a_container_with_a_display_or_kernel_parameters_is_refused_where_it_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let definition = "[containers.desk]\ngraphics = true\n\n[containers.tuned]\nkernel_params = [\"quiet\"]\n\n[containers.plain]\n\n[test]\nscript = \"plain.succeed('true')\"\n";
    fs::write(dir.path().join("vmrig.toml"), definition).unwrap();
    let (code, output) = vmrig_check(dir.path());
    assert_eq!(code, 2, "{output}");
    let toml = dir.path().join("vmrig.toml");
    for (key, line, why) in [
        ("graphics", line_of(definition, "graphics"), "a container has no display"),
        ("kernel_params", line_of(definition, "kernel_params"), "a container runs on the host's kernel"),
    ] {
        assert!(output.contains(&format!("cannot have `{key}`: {why}")), "{output}");
        assert!(output.contains(&format!("--> {}:{line}:", toml.display())), "{output}");
    }
    assert!(output.contains("make it a VM (`[nodes.desk]`)"), "{output}");
}
