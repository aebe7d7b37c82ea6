//! Nodes with a display (`graphics = true`) on real VMs: their virtual
//! terminals on a screen, driven by keys as NixOS tests drive them
//! (nixpkgs's `login.nix`, in vmrig's words), screenshots, and their
//! text read by OCR.

mod common;

use std::fs;
use std::path::Path;

use common::run;

/// A PNG's width and height, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let number = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    (number(16), number(20))
}

#[test]
fn root_logs_in_on_a_terminal_switched_to_by_typing_and_the_screen_is_saved() {
    let test = tempfile::tempdir().unwrap();
    fs::write(
        test.path().join("vmrig.toml"),
        r#"
[nodes.desk]
graphics = true

[nodes.plain]

[test]
script = '''
desk.wait_for_unit("multi-user.target")
desk.wait_until_succeeds("pgrep -f 'agetty.*tty1'")
desk.wait_until_tty_matches("1", "login: ")
desk.screenshot("at-boot")

with subtest("switching to the second terminal starts a login prompt there"):
    desk.fail("pgrep -f 'agetty.*tty2'")
    desk.send_key("alt-f2")
    desk.wait_until_succeeds("grep -x tty2 /sys/class/tty/tty0/active")
    desk.wait_until_succeeds("pgrep -f 'agetty.*tty2'")
    desk.wait_until_tty_matches("2", "login: ")

with subtest("root logs in by typing, and what it types runs"):
    desk.send_chars("root\n")
    desk.wait_until_succeeds("pgrep -u root -t tty2 bash")
    desk.send_chars("echo 'Typed: $HOME & (1+2)*3 = ~9?' > /tmp/typed\n")
    desk.wait_for_file("/tmp/typed")
    assert desk.succeed("cat /tmp/typed") == "Typed: $HOME & (1+2)*3 = ~9?\n", desk.succeed("cat /tmp/typed")
    desk.wait_until_tty_matches("2", "root@desk")
    desk.screenshot("logged-in.png")

with subtest("what is on the screen is read by OCR"):
    desk.wait_for_text("Typed: .HOME")
    variants = desk.get_screen_text_variants()
    assert len(variants) == 3, variants
    assert "login" in desk.get_screen_text(), desk.get_screen_text()

with subtest("a node without a display says so"):
    try:
        plain.send_key("ret")
    except Exception as e:
        assert "plain has no keyboard: give it `graphics = true`" in str(e), str(e)
    else:
        raise Exception("a headless node took a key")

with subtest("the X calls say what a node lacks"):
    for machine, lack in ((plain, "plain has no display"), (desk, "add `x11-utils` to the node's packages")):
        try:
            machine.wait_for_x(timeout=5)
        except Exception as e:
            assert lack in str(e), str(e)
        else:
            raise Exception(f"{machine.name} waited for X")
'''
"#,
    )
    .unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");

    let result = test.path().join("result");
    let at_boot = fs::read(result.join("at-boot.png")).unwrap();
    let logged_in = fs::read(result.join("logged-in.png")).unwrap();
    let (width, height) = png_size(&at_boot);
    assert!(width >= 640 && height >= 480, "{width}x{height}");
    assert_eq!(png_size(&logged_in), (width, height));
    assert_ne!(at_boot, logged_in, "the screen did not change");
    assert!(output.contains("desk: sending keys \"root\\n\""), "{output}");
    assert!(output.contains("(finished: waiting for Typed: .HOME to appear on the screen"), "{output}");
    let report = fs::read_to_string(result.join("report.html")).unwrap();
    assert!(report.contains("logged-in.png"), "the report does not show the screenshot");
    assert!(Path::new(&result.join("junit.xml")).exists());
}
