//! Desktops on a node with a display, on real VMs, after nixpkgs's X11
//! and Wayland tests in vmrig's words: root logs in on tty1 by typing,
//! starts an X session (twm and xterm) and types into it, leaves it, and
//! starts a Wayland compositor (cage showing foot) and types into that.
//! The X calls (`wait_for_x`, `wait_for_window`, `get_window_names`) and
//! `wait_for_text` are checked against what was typed.

mod common;

use std::fs;

use common::run;

#[test]
fn an_x_session_and_a_wayland_compositor_show_what_is_typed_into_them() {
    let test = tempfile::tempdir().unwrap();
    fs::write(
        test.path().join("vmrig.toml"),
        r#"
[nodes.desk]
graphics = true
memory = 768
packages = [
    "xserver-xorg-core", "xserver-xorg-input-libinput", "xinit", "twm", "xterm", "x11-utils",
    "cage", "xwayland", "seatd", "foot", "fonts-dejavu-core",
]
# The session ends with its xterm, which covers the middle of the screen,
# where the pointer is: X gives the keys to the window under it.
files."/root/.xinitrc" = { text = "twm &\nexec xterm -geometry 160x50+0+0\n" }
# The display has no 3D: X would spend ten seconds finding llvmpipe to
# refuse it.
files."/etc/X11/xorg.conf.d/10-no-glamor.conf" = { text = """
Section "Device"
    Identifier "display"
    Driver "modesetting"
    Option "AccelMethod" "none"
EndSection
""" }
# cage shows foot on the whole screen. It refuses to run as root: alice
# runs it, on the seat that seatd (started by its package) gives the
# video group. No login session gives her a runtime directory, and the
# display has no 3D. (cage starts Xwayland too, and fails without it.)
users.alice = { groups = ["video"] }
files."/usr/local/bin/wayland-session" = { mode = "0755", text = """
#!/bin/sh
export XDG_RUNTIME_DIR=/run/wayland WLR_RENDERER=pixman
mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
chown alice "$XDG_RUNTIME_DIR"
exec runuser -u alice -- cage -- foot
""" }

[test]
script = '''
desk.wait_for_unit("multi-user.target")

with subtest("root logs in on tty1 by typing"):
    desk.wait_until_tty_matches("1", "login: ")
    desk.send_chars("root\n")
    desk.wait_until_tty_matches("1", "root@desk")

with subtest("an X session: the server answers, xterm's window appears and takes keys"):
    desk.send_chars("startx\n")
    desk.wait_for_x()
    desk.wait_for_window("xterm")
    assert "xterm" in desk.get_window_names(), desk.get_window_names()
    # The window is there before twm has shown it: keys sent then are lost.
    desk.wait_for_text("root@desk")
    desk.send_chars("echo hello > /tmp/typed\n")
    desk.wait_for_file("/tmp/typed")
    assert desk.succeed("cat /tmp/typed") == "hello\n", desk.succeed("cat /tmp/typed")
    desk.wait_for_text("hello")
    desk.screenshot("x-session")

with subtest("the session ends with its xterm"):
    desk.send_chars("exit\n")
    desk.wait_until_fails("pgrep -x Xorg")
    try:
        desk.get_window_names()
    except Exception as e:
        assert "does not answer" in str(e), str(e)
    else:
        raise Exception("windows listed with no X server")

with subtest("a Wayland compositor shows a line typed into its terminal"):
    desk.send_chars("wayland-session\n")
    desk.wait_until_succeeds("pgrep -u alice -x bash")
    desk.wait_for_text("alice@desk")
    desk.send_chars("echo Wayland says hi > /tmp/wayland\n")
    desk.wait_for_file("/tmp/wayland")
    desk.wait_for_text("Wayland says hi")
    desk.screenshot("wayland")
'''
"#,
    )
    .unwrap();
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");

    let result = test.path().join("result");
    let x_session = fs::read(result.join("x-session.png")).unwrap();
    let wayland = fs::read(result.join("wayland.png")).unwrap();
    assert_ne!(x_session, wayland, "the two sessions' screens are the same");
    assert!(output.contains("(finished: waiting for the X11 server"), "{output}");
    assert!(output.contains("(finished: waiting for a window named xterm to appear"), "{output}");
}
